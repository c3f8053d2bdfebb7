//! safetensors files: memory-mapped reading with lazy decoding, and atomic streaming writes.
//!
//! Reading maps the file and validates the header with the `safetensors` crate (offsets in order,
//! no gap or overlap, byte counts that match shape and dtype, the last offset at the end of the
//! file, a header under 100 MB); tensor data stays in the map until a tensor is decoded. Data in a
//! safetensors file is not aligned, so decoding goes through `from_le_bytes`.
//!
//! Writing streams tensors one at a time into a temporary file beside the target, then fsyncs and
//! renames it; the header is computed up front from the planned shapes and dtypes. Large tensors
//! are decoded and encoded in parallel pieces (rayon's pool) straight into the buffers of a writer
//! thread, which writes them while the next ones are encoded; every element is converted by the
//! same function whatever the threads, so the bytes are those of a sequential writer.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use indexmap::IndexMap;
use lora_core::{DType, Scalar, Stored, TensorInfo, TensorSource};
use memmap2::Mmap;
use ndarray::{ArrayD, ArrayRef, Dimension, IxDyn};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::atomic::AtomicFile;
use crate::error::{Error, Location, Result};

/// The safetensors crate's limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(Debug)]
enum Bytes {
    Map(Mmap),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
        }
    }
}

/// A memory-mapped safetensors file. Opening validates the header; tensors are decoded only when
/// read, one at a time, to f32 or f64 from F32, F16, BF16 or F64.
///
/// As a [`TensorSource`] it lists the floating-point tensors only; tensors of other dtypes
/// (integer buffers) are visible through [`SafetensorsFile::names`] and can be copied raw.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    tensors: IndexMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Map and validate a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::header(
                Location::file(path),
                format!("file has {len} bytes, fewer than the 8-byte header length"),
            ));
        }
        let map = map_file(&file).map_err(|e| Error::io(path, e))?;
        let buffer: &[u8] = &map;
        check_offsets_in_range(path, buffer)?;
        let (n, meta) = SafeTensors::read_metadata(buffer).map_err(|e| describe(path, buffer, e))?;
        let mut tensors = IndexMap::new();
        for name in meta.offset_keys() {
            let info = meta.info(&name).expect("offset_keys lists known tensors");
            let (start, end) = info.data_offsets;
            tensors.insert(name, Entry { dtype: info.dtype, shape: info.shape.clone(), start, end });
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), bytes: Bytes::Map(map), data_start: 8 + n, tensors, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor name, in the order of the data in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// True when the file has a tensor of this name (of any dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a tensor of any dtype.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype's name as safetensors spells it (`"F32"`, `"I64"`).
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| dtype_name(e.dtype))
    }

    /// The stored dtype, when it is one this crate decodes.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).and_then(|e| float_dtype(e.dtype))
    }

    /// The raw little-endian bytes of a tensor, without copying.
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.tensors.get(name).map(|e| &self.bytes.as_slice()[self.data_start + e.start..self.data_start + e.end])
    }

    /// Drop the pages holding a tensor's bytes from this process's resident memory (the kernel
    /// keeps them in its page cache; a later read maps them again). Decoding does this on its
    /// own, so a pass over a model keeps one tensor's pages resident at a time, not the whole
    /// file: extracting from two 2 GB models would otherwise end with 4 GB resident. Callers
    /// that copy [`SafetensorsFile::raw`] bytes call it when done with them.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            let Bytes::Map(map) = &self.bytes;
            release_pages(map, self.data_start + e.start, e.end - e.start);
        }
    }

    /// Total bytes of tensor data.
    pub fn data_len(&self) -> usize {
        self.bytes.as_slice().len() - self.data_start
    }

    /// Decode a tensor to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        self.decode(name, decode_f32)
    }

    /// Decode a tensor to f64 (exact from every stored float dtype).
    pub fn tensor_f64(&self, name: &str) -> Result<ArrayD<f64>> {
        self.decode(name, decode_f64)
    }

    /// Decode a tensor in `T` (f32 loses precision only for F64 tensors).
    pub fn tensor<T: Scalar>(&self, name: &str) -> Result<ArrayD<T>> {
        T::read_from(self, name).map_err(|e| from_core(&self.path, name, e))
    }

    fn decode<T>(&self, name: &str, f: impl Fn(Dtype, &[u8]) -> std::result::Result<Vec<T>, ()>) -> Result<ArrayD<T>> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::TensorNotFound { at: self.at(name) })?;
        let raw = self.raw(name).expect("entry exists");
        let values = f(entry.dtype, raw)
            .map_err(|()| Error::UnsupportedDType { at: self.at(name), dtype: dtype_name(entry.dtype) })?;
        self.release(name);
        ArrayD::from_shape_vec(IxDyn(&entry.shape), values).map_err(|_| Error::Shape {
            at: self.at(name),
            expected: format!("{} elements", entry.shape.iter().product::<usize>()),
            got: entry.shape.clone(),
        })
    }

    fn at(&self, name: &str) -> Location {
        Location::tensor(&self.path, name)
    }
}

impl TensorSource for SafetensorsFile {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().filter(|(_, e)| float_dtype(e.dtype).is_some()).map(|(n, _)| n.clone()).collect()
    }

    fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        let e = self.tensors.get(name)?;
        float_dtype(e.dtype).map(|dtype| TensorInfo { shape: e.shape.clone(), dtype })
    }

    fn read_f32(&self, name: &str) -> lora_core::Result<ArrayD<f32>> {
        Ok(self.tensor_f32(name)?)
    }

    fn read_f64(&self, name: &str) -> lora_core::Result<ArrayD<f64>> {
        Ok(self.tensor_f64(name)?)
    }

    fn stored(&self, name: &str) -> Option<Stored<'_>> {
        Some(Stored { dtype: self.dtype(name)?, bytes: self.raw(name)? })
    }

    fn release(&self, name: &str) {
        SafetensorsFile::release(self, name);
    }
}

/// Undo the wrapping of our own error into lora-core's by the `TensorSource` impl.
pub(crate) fn from_core(path: &Path, name: &str, e: lora_core::Error) -> Error {
    match e {
        lora_core::Error::Source { source, .. } => match source.downcast::<Error>() {
            Ok(mine) => *mine,
            Err(other) => Error::header(Location::tensor(path, name), other.to_string()),
        },
        other => Error::core(Location::tensor(path, name), other),
    }
}

#[allow(unsafe_code)]
fn release_pages(map: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    if len > 0 {
        // SAFETY: the map is a read-only, shared mapping of a file: MADV_DONTNEED removes the
        // pages from this process's page tables and a later access faults them in again from
        // the same file, so every byte (and every reference into the map) reads the same
        // values. The range lies inside the map (an entry of its validated header). A failure
        // only means the pages stay resident, so it is ignored.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only. As with every memory-mapped reader, a process that truncates
    // or rewrites the file while it is mapped can change what we read (or raise SIGBUS); this
    // crate's own writers never modify a file in place (they write a new file and rename it).
    unsafe { Mmap::map(file) }
}

fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

pub(crate) fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
    }
}

fn dtype_name(d: Dtype) -> String {
    serde_json::to_value(d).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| format!("{d:?}"))
}

/// Elements per piece of parallel decoding and encoding.
const PIECE: usize = 1 << 15;
/// Tensors of fewer elements are decoded and encoded on the calling thread.
const PARALLEL_MIN: usize = 1 << 17;

/// Bytes per element of the float dtypes this crate decodes and encodes.
fn float_width(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F32 => Some(4),
        Dtype::F64 => Some(8),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Decode little-endian `d` values into `out` (`out.len()` elements of `b`); `d` is a float
/// dtype.
fn decode_f32_into(d: Dtype, b: &[u8], out: &mut [f32]) {
    f32::decode_le(float_dtype(d).expect("a float dtype"), b, out);
}

/// Decode a tensor's bytes to f32. A large tensor is decoded in pieces in parallel (rayon's
/// pool), each element by the same conversion, so the result does not depend on the threads;
/// a small one is collected straight into its vector.
fn decode_f32(d: Dtype, b: &[u8]) -> std::result::Result<Vec<f32>, ()> {
    let width = float_width(d).ok_or(())?;
    let n = b.len() / width;
    if n >= PARALLEL_MIN {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(PIECE).zip(b.par_chunks(PIECE * width)).for_each(|(o, c)| decode_f32_into(d, c, o));
        return Ok(out);
    }
    let chunks = b.chunks_exact(width);
    Ok(match d {
        Dtype::F32 => chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => chunks.map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => chunks.map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => chunks.map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
    })
}

fn decode_f64(d: Dtype, b: &[u8]) -> std::result::Result<Vec<f64>, ()> {
    let widen = |v: Vec<f32>| -> Vec<f64> {
        if v.len() >= PARALLEL_MIN {
            v.par_iter().map(|&x| f64::from(x)).collect()
        } else {
            v.into_iter().map(f64::from).collect()
        }
    };
    match d {
        Dtype::F64 => {
            let one = |c: &[u8]| f64::from_le_bytes(c.try_into().expect("8 bytes"));
            if b.len() / 8 >= PARALLEL_MIN {
                Ok(b.par_chunks_exact(8).map(one).collect())
            } else {
                Ok(b.chunks_exact(8).map(one).collect())
            }
        }
        _ => Ok(widen(decode_f32(d, b)?)),
    }
}

/// Refuse data offsets that end past the end of the file before the safetensors crate sees the
/// header: its validation adds the last offset to the header length unchecked, which overflows
/// (a panic where overflow checks are on) when a header claims offsets near 2^64. Headers that
/// do not parse are left to the crate, which says why.
fn check_offsets_in_range(path: &Path, buffer: &[u8]) -> Result<()> {
    let header = buffer
        .get(..8)
        .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
        .filter(|&n| n as u64 <= MAX_HEADER)
        .and_then(|n| buffer.get(8..8 + n));
    let Some(header) = header else { return Ok(()) };
    let data_len = (buffer.len() - 8 - header.len()) as u64;
    let Ok(entries) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header) else {
        return Ok(());
    };
    for (name, info) in entries.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info.get("data_offsets").and_then(serde_json::Value::as_array).map(Vec::as_slice);
        if let Some([s, e]) = offsets {
            if let (Some(s), Some(e)) = (s.as_u64(), e.as_u64()) {
                if e > data_len {
                    return Err(Error::header(
                        Location::tensor(path, name),
                        format!("data offsets {s}..{e} run past the end of the data ({data_len} bytes): truncated file or out-of-range offsets"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Turn the safetensors crate's error into one that names the file and, where it can be found,
/// the tensor.
fn describe(path: &Path, buffer: &[u8], e: SafeTensorError) -> Error {
    let file = Location::file(path);
    let n = u64::from_le_bytes(buffer[..8].try_into().expect("checked length >= 8"));
    match e {
        SafeTensorError::HeaderTooSmall => Error::header(file, "file is shorter than the 8-byte header length"),
        SafeTensorError::HeaderTooLarge => {
            Error::header(file, format!("header length {n} bytes is over the {MAX_HEADER}-byte limit"))
        }
        SafeTensorError::InvalidHeaderLength => Error::header(
            file,
            format!("header length {n} bytes runs past the end of the file ({} bytes)", buffer.len()),
        ),
        SafeTensorError::InvalidHeader(e) => Error::header(file, format!("header is not utf-8: {e}")),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            Error::header(file, format!("header is not a valid safetensors json header: {e}"))
        }
        SafeTensorError::InvalidOffset(name) => Error::header(
            Location::tensor(path, name),
            "data offsets overlap the previous tensor, leave a gap, or end before they start",
        ),
        other => match diagnose(buffer) {
            Some((tensor, reason)) => Error::header(Location::tensor(path, tensor), reason),
            None => Error::header(file, other.to_string()),
        },
    }
}

/// Find the tensor whose byte count disagrees with its shape and dtype, or that runs past the end
/// of the file. Only called on a header the safetensors crate has already refused.
fn diagnose(buffer: &[u8]) -> Option<(String, String)> {
    let n = usize::try_from(u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buffer.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = buffer.len() - 8 - n;
    let mut entries: Vec<(String, safetensors::tensor::TensorInfo)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|i| (k, i)))
        .collect();
    entries.sort_by_key(|(_, i)| i.data_offsets);
    for (name, info) in &entries {
        let (s, e) = info.data_offsets;
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|c| c.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else {
            return Some((name.clone(), format!("shape {:?} overflows", info.shape)));
        };
        if bits % 8 != 0 || e.checked_sub(s) != Some(bits / 8) {
            return Some((
                name.clone(),
                format!(
                    "byte count {} (offsets {s}..{e}) disagrees with shape {:?} and dtype {} ({} bytes)",
                    e.saturating_sub(s),
                    info.shape,
                    dtype_name(info.dtype),
                    bits / 8
                ),
            ));
        }
        if e > data_len {
            return Some((
                name.clone(),
                format!("data offsets {s}..{e} run past the end of the data ({data_len} bytes): truncated file or out-of-range offsets"),
            ));
        }
    }
    let end = entries.last().map_or(0, |(_, i)| i.data_offsets.1);
    Some((
        entries.last().map(|(n, _)| n.clone()).unwrap_or_default(),
        format!("the last tensor ends at byte {end} of the data but the file holds {data_len} bytes of data"),
    ))
    .filter(|(n, _)| !n.is_empty())
}

/// One tensor a [`SafetensorsWriter`] will write: name, shape and stored dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
}

impl PlannedTensor {
    /// A float tensor to be written in `dtype`.
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> Self {
        PlannedTensor { name: name.into(), shape: shape.to_vec(), dtype: st_dtype(dtype) }
    }

    /// A tensor with the name, shape and dtype it has in `file` (of any dtype), for a raw copy.
    pub fn like(file: &SafetensorsFile, name: &str) -> Option<Self> {
        file.tensors.get(name).map(|e| PlannedTensor { name: name.into(), shape: e.shape.clone(), dtype: e.dtype })
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes a safetensors file tensor by tensor, in the planned order, atomically: nothing appears
/// at the path until [`SafetensorsWriter::finish`] succeeds.
#[derive(Debug)]
pub struct SafetensorsWriter {
    file: AtomicFile,
    plan: Vec<PlannedTensor>,
    next: usize,
}

impl SafetensorsWriter {
    /// Start a file with these tensors (in this order) and `__metadata__` (left out when empty).
    pub fn create(
        path: impl AsRef<Path>,
        plan: Vec<PlannedTensor>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialise"));
        }
        let mut offset = 0usize;
        for t in &plan {
            if t.name == "__metadata__" || header.contains_key(&t.name) {
                return Err(Error::config(Location::tensor(path, &t.name), "duplicate or reserved tensor name"));
            }
            let end = offset + t.byte_len();
            header.insert(
                t.name.clone(),
                serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&header).expect("header serialises");
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        if json.len() as u64 > MAX_HEADER {
            return Err(Error::header(Location::file(path), "header would be over the 100 MB limit"));
        }
        let mut file = AtomicFile::create(path)?;
        file.write_all(&(json.len() as u64).to_le_bytes())?;
        file.write_all(&json)?;
        Ok(SafetensorsWriter { file, plan, next: 0 })
    }

    /// Write the next tensor from float values, converted to its planned dtype. Large tensors
    /// are encoded in parallel straight into the buffers a writer thread writes out.
    pub fn write<T: Scalar, D: Dimension>(&mut self, name: &str, tensor: &ArrayRef<T, D>) -> Result<()> {
        let planned = self.expect(name)?;
        if tensor.shape() != planned.shape.as_slice() {
            return Err(Error::Shape {
                at: Location::tensor(self.file.path(), name),
                expected: format!("{:?}", planned.shape),
                got: tensor.shape().to_vec(),
            });
        }
        let dtype = planned.dtype;
        let width = float_width(dtype).ok_or_else(|| Error::UnsupportedDType {
            at: Location::tensor(self.file.path(), name),
            dtype: dtype_name(dtype),
        })?;
        let path = self.file.path().to_path_buf();
        let shape = planned.shape.clone();
        let fail = |e: Encode, first: usize| encode_error(e, Location::tensor(&path, name), first, &shape, dtype);
        if let Some(slice) = tensor.as_slice() {
            // Contiguous row-major data: plain slices, no n-dimensional iterator.
            self.file.fill(slice.len() * width, width, |out, offset| {
                let start = offset / width;
                encode_into(dtype, &slice[start..start + out.len() / width], out).map_err(|e| fail(e, start))
            })?;
        } else {
            let mut buf = vec![0u8; CHUNK * width];
            let mut done = 0usize;
            let mut it = tensor.iter().peekable();
            while it.peek().is_some() {
                let chunk: Vec<T> = it.by_ref().take(CHUNK).copied().collect();
                let out = &mut buf[..chunk.len() * width];
                encode_into(dtype, &chunk, out).map_err(|e| fail(e, done))?;
                self.file.write_all(out)?;
                done += chunk.len();
            }
        }
        self.next += 1;
        Ok(())
    }

    /// Write the next tensor from the raw little-endian bytes of a float tensor stored as `from`
    /// (F32, F16, BF16 or F64), converted to its planned dtype without forming the whole tensor:
    /// each element goes through f32, as decoding to f32 and encoding would take it.
    pub fn write_converted(&mut self, name: &str, from: DType, bytes: &[u8]) -> Result<()> {
        let planned = self.expect(name)?;
        let (from, to) = (st_dtype(from), planned.dtype);
        let (Some(in_w), Some(out_w)) = (float_width(from), float_width(to)) else {
            return Err(Error::UnsupportedDType {
                at: Location::tensor(self.file.path(), name),
                dtype: dtype_name(to),
            });
        };
        let n = planned.shape.iter().product::<usize>();
        if bytes.len() != n * in_w {
            return Err(Error::header(
                Location::tensor(self.file.path(), name),
                format!(
                    "{} bytes given, shape {:?} in {} needs {}",
                    bytes.len(),
                    planned.shape,
                    dtype_name(from),
                    n * in_w
                ),
            ));
        }
        let (path, shape) = (self.file.path().to_path_buf(), planned.shape.clone());
        self.file.fill(n * out_w, out_w, |out, offset| {
            let start = offset / out_w * in_w;
            convert_into(from, &bytes[start..start + out.len() / out_w * in_w], to, out)
                .map_err(|e| encode_error(e, Location::tensor(&path, name), offset / out_w, &shape, to))
        })?;
        self.next += 1;
        Ok(())
    }

    /// Write the next tensor's rows in another order: `bytes` holds its rows as stored (in the
    /// planned dtype) and `order[i]` is the stored row written i-th.
    pub(crate) fn write_raw_rows(&mut self, name: &str, bytes: &[u8], order: &[usize]) -> Result<()> {
        let planned = self.expect(name)?;
        let rows = planned.shape.first().copied().unwrap_or(1);
        let valid = bytes.len() == planned.byte_len() && order.len() == rows && order.iter().all(|&r| r < rows);
        if !valid || rows == 0 {
            return Err(Error::header(
                Location::tensor(self.file.path(), name),
                format!(
                    "{} bytes in {} rows given, shape and dtype need {}",
                    bytes.len(),
                    order.len(),
                    planned.byte_len()
                ),
            ));
        }
        let row = bytes.len() / rows;
        for &r in order {
            self.file.write_all(&bytes[r * row..(r + 1) * row])?;
        }
        self.next += 1;
        Ok(())
    }

    /// Write the next tensor's bytes as they are (little-endian, in the planned dtype).
    pub fn write_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let planned = self.expect(name)?;
        if bytes.len() != planned.byte_len() {
            return Err(Error::header(
                Location::tensor(self.file.path(), name),
                format!("{} bytes given, shape and dtype need {}", bytes.len(), planned.byte_len()),
            ));
        }
        self.file.write_all(bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Check that every planned tensor was written, then fsync and rename into place.
    pub fn finish(self) -> Result<()> {
        if let Some(t) = self.plan.get(self.next) {
            return Err(Error::MissingPair {
                at: Location::tensor(self.file.path(), &t.name),
                missing: "data (the writer was finished before this planned tensor was written)".into(),
            });
        }
        self.file.commit()
    }

    fn expect(&self, name: &str) -> Result<&PlannedTensor> {
        match self.plan.get(self.next) {
            Some(t) if t.name == name => Ok(t),
            Some(t) => Err(Error::config(
                Location::tensor(self.file.path(), name),
                format!("tensors must be written in the planned order; expected {} next", t.name),
            )),
            None => Err(Error::config(Location::tensor(self.file.path(), name), "tensor was not planned")),
        }
    }
}

/// Elements per chunk of a tensor that is not contiguous.
const CHUNK: usize = 1 << 16;

/// Why [`encode_into`] could not encode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Encode {
    /// The dtype is not a float dtype.
    Unsupported,
    /// A finite value would become an infinity in the stored dtype.
    Overflow {
        /// Its position among the values given.
        position: usize,
        /// The value.
        value: f64,
    },
}

impl Encode {
    /// The same error for values that start `first` elements further on.
    fn shifted(self, first: usize) -> Self {
        match self {
            Encode::Overflow { position, value } => Encode::Overflow { position: position + first, value },
            other => other,
        }
    }
}

/// Encode values as little-endian `dtype` into `out` (`values.len()` x the dtype's width bytes),
/// rounding to nearest even. The dtype is matched once per piece, not per element, and the
/// output is filled in place (which the compiler vectorises); f32 inputs go to f16 / bf16
/// through the f32 conversions (exact widening, so the same result as from f64). Pieces of a
/// large slice are encoded in parallel; every element is converted alone, so the bytes do not
/// depend on the threads. A finite value that rounds to an infinity in `dtype` (|x| >= 65520 in
/// f16, beyond bf16's or f32's range) is an error (the first such value, whatever the threads),
/// never a silent Inf; NaN and infinities already in the input are stored as they are.
pub(crate) fn encode_into<T: Scalar>(dtype: Dtype, values: &[T], out: &mut [u8]) -> std::result::Result<(), Encode> {
    let width = float_width(dtype).ok_or(Encode::Unsupported)?;
    debug_assert_eq!(out.len(), values.len() * width);
    if values.len() >= PARALLEL_MIN {
        let failed = out
            .par_chunks_mut(PIECE * width)
            .zip(values.par_chunks(PIECE))
            .enumerate()
            .map(|(i, (o, v))| encode_piece(dtype, v, o).map_err(|e| e.shifted(i * PIECE)))
            .find_first(|r| r.is_err());
        failed.unwrap_or(Ok(()))
    } else {
        encode_piece(dtype, values, out)
    }
}

/// [`encode_into`] a growing buffer.
#[cfg(test)]
pub(crate) fn encode<T: Scalar>(dtype: Dtype, values: &[T], out: &mut Vec<u8>) -> std::result::Result<(), Encode> {
    out.resize(values.len() * float_width(dtype).ok_or(Encode::Unsupported)?, 0);
    encode_into(dtype, values, out)
}

fn encode_piece<T: Scalar>(dtype: Dtype, values: &[T], out: &mut [u8]) -> std::result::Result<(), Encode> {
    let is_f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    let (width, largest) = match dtype {
        Dtype::F32 => (4, if is_f32 { f64::INFINITY } else { f64::from(f32::MAX) }),
        Dtype::F64 => (8, f64::INFINITY),
        Dtype::F16 => (2, f64::from(f16::MAX)),
        Dtype::BF16 => (2, f64::from(bf16::MAX)),
        _ => return Err(Encode::Unsupported),
    };
    let chunks = out.chunks_exact_mut(width).zip(values.iter());
    match dtype {
        Dtype::F32 => chunks.for_each(|(o, v)| o.copy_from_slice(&(v.as_f64() as f32).to_le_bytes())),
        Dtype::F64 => chunks.for_each(|(o, v)| o.copy_from_slice(&v.as_f64().to_le_bytes())),
        Dtype::F16 if is_f32 => {
            chunks.for_each(|(o, v)| o.copy_from_slice(&f16::from_f32(v.as_f64() as f32).to_le_bytes()))
        }
        Dtype::F16 => chunks.for_each(|(o, v)| o.copy_from_slice(&f16::from_f64(v.as_f64()).to_le_bytes())),
        Dtype::BF16 if is_f32 => {
            chunks.for_each(|(o, v)| o.copy_from_slice(&bf16::from_f32(v.as_f64() as f32).to_le_bytes()))
        }
        _ => chunks.for_each(|(o, v)| o.copy_from_slice(&bf16::from_f64(v.as_f64()).to_le_bytes())),
    }
    if largest.is_finite() {
        // One branch-free pass for the common case; the exact check only when some value is
        // past the largest finite value (which may still round down to it).
        let peak = values.iter().fold(0.0f64, |m, v| {
            let a = v.as_f64().abs();
            if a.is_finite() && a > m {
                a
            } else {
                m
            }
        });
        if peak > largest {
            for (position, (o, v)) in out.chunks_exact(width).zip(values.iter()).enumerate() {
                let stored_infinite = match dtype {
                    Dtype::F32 => f32::from_le_bytes([o[0], o[1], o[2], o[3]]).is_infinite(),
                    Dtype::F16 => f16::from_le_bytes([o[0], o[1]]).is_infinite(),
                    _ => bf16::from_le_bytes([o[0], o[1]]).is_infinite(),
                };
                if stored_infinite && v.is_finite() {
                    return Err(Encode::Overflow { position, value: v.as_f64() });
                }
            }
        }
    }
    Ok(())
}

/// Decode the stored bytes of a float tensor to f32 (F64 rounded), as [`SafetensorsFile::tensor_f32`].
pub(crate) fn decode_to_f32(d: DType, b: &[u8]) -> Vec<f32> {
    decode_f32(st_dtype(d), b).unwrap_or_default()
}

/// [`convert_into`] for lora-core dtypes.
pub(crate) fn convert_bytes(from: DType, bytes: &[u8], to: DType, out: &mut [u8]) -> std::result::Result<(), Encode> {
    convert_into(st_dtype(from), bytes, st_dtype(to), out)
}

/// Convert little-endian `from` bytes to little-endian `to` bytes through f32, a block at a
/// time on the stack; large inputs in parallel. Overflow in `to` is an error, as in
/// [`encode_into`] (its position counts elements of the input).
fn convert_into(from: Dtype, bytes: &[u8], to: Dtype, out: &mut [u8]) -> std::result::Result<(), Encode> {
    let (in_w, out_w) = (float_width(from).unwrap_or(4), float_width(to).ok_or(Encode::Unsupported)?);
    let piece = |b: &[u8], o: &mut [u8]| -> std::result::Result<(), Encode> {
        let mut block = [0f32; 1024];
        for (k, (bi, oi)) in b.chunks(1024 * in_w).zip(o.chunks_mut(1024 * out_w)).enumerate() {
            let vals = &mut block[..bi.len() / in_w];
            decode_f32_into(from, bi, vals);
            encode_piece(to, vals, oi).map_err(|e| e.shifted(k * 1024))?;
        }
        Ok(())
    };
    if bytes.len() / in_w >= PARALLEL_MIN {
        let failed = bytes
            .par_chunks(PIECE * in_w)
            .zip(out.par_chunks_mut(PIECE * out_w))
            .enumerate()
            .map(|(i, (b, o))| piece(b, o).map_err(|e| e.shifted(i * PIECE)))
            .find_first(|r| r.is_err());
        failed.unwrap_or(Ok(()))
    } else {
        piece(bytes, out)
    }
}

/// The error for a failed [`encode`] of the chunk starting at flat position `first` of a tensor
/// of this shape.
pub(crate) fn encode_error(e: Encode, at: Location, first: usize, shape: &[usize], dtype: Dtype) -> Error {
    match e {
        Encode::Unsupported => Error::UnsupportedDType { at, dtype: dtype_name(dtype) },
        Encode::Overflow { position, value } => {
            Error::Overflow { at, index: unravel(first + position, shape), value, dtype: dtype_name(dtype) }
        }
    }
}

/// The flat position and value of the first NaN or infinity in little-endian `dtype` bytes.
pub fn first_nonfinite_raw(dtype: DType, raw: &[u8]) -> Option<(usize, f64)> {
    let width = dtype.size();
    // In pieces of 1 MiB on rayon's pool: two cores fault the mapped pages in about twice as
    // fast as one. The position is only looked for when there is a NaN or an infinity.
    if !raw.par_chunks(1 << 20).any(|piece| has_nonfinite(dtype, piece)) {
        return None;
    }
    let word = |c: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(b)
    };
    let exponent = nonfinite_exponent(dtype);
    raw.chunks_exact(width).enumerate().find(|(_, c)| word(c) & exponent == exponent).map(|(i, c)| {
        let value = match dtype {
            DType::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::F16 => f64::from(half::f16::from_le_bytes([c[0], c[1]])),
            DType::BF16 => f64::from(half::bf16::from_le_bytes([c[0], c[1]])),
            DType::F64 => f64::from_bits(word(c)),
        };
        (i, value)
    })
}

/// The exponent bits of a `dtype` value: all of them set in a NaN or an infinity only.
fn nonfinite_exponent(dtype: DType) -> u64 {
    match dtype {
        DType::F32 => 0x7f80_0000,
        DType::F16 => 0x7c00,
        DType::BF16 => 0x7f80,
        DType::F64 => 0x7ff0_0000_0000_0000,
    }
}

/// Whether little-endian `dtype` bytes hold a NaN or an infinity. The largest exponent over
/// the whole piece, with no early exit, so that the loop vectorises: an `any` that stops at the
/// first value compiled to one compare and branch per value, 16% of `lora merge`'s samples on
/// the issue-5 bench model (docs/benchmarks.md, "Session 10").
fn has_nonfinite(dtype: DType, piece: &[u8]) -> bool {
    let exponent = nonfinite_exponent(dtype);
    let largest = match dtype {
        DType::F32 => largest_masked::<4, u32>(piece, u32::from_le_bytes, exponent as u32).into(),
        DType::F16 | DType::BF16 => largest_masked::<2, u16>(piece, u16::from_le_bytes, exponent as u16).into(),
        DType::F64 => largest_masked::<8, u64>(piece, u64::from_le_bytes, exponent),
    };
    largest == exponent
}

/// The largest of `bits(element) & mask` over the `W`-byte elements of `bytes`.
#[inline(always)]
fn largest_masked<const W: usize, U: Copy + Ord + Default + std::ops::BitAnd<Output = U>>(
    bytes: &[u8],
    bits: impl Fn([u8; W]) -> U,
    mask: U,
) -> U {
    bytes.chunks_exact(W).map(|c| bits(c.try_into().expect("W bytes")) & mask).fold(U::default(), std::cmp::Ord::max)
}

/// The n-dimensional index of a row-major flat position.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &len) in shape.iter().enumerate().rev() {
        if len > 0 {
            index[i] = flat % len;
            flat /= len;
        }
    }
    index
}

/// Write float tensors (in this order) to a safetensors file in one dtype, atomically.
pub fn write_safetensors<T: Scalar>(
    path: impl AsRef<Path>,
    tensors: &[(String, ArrayD<T>)],
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let plan = tensors.iter().map(|(n, t)| PlannedTensor::new(n.clone(), t.shape(), dtype)).collect();
    let mut w = SafetensorsWriter::create(path, plan, metadata)?;
    for (n, t) in tensors {
        w.write(n, t)?;
    }
    w.finish()
}
