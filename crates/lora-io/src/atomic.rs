//! Atomic file writes: a temporary file in the target folder, fsync, rename.
//!
//! A failure or a kill before [`AtomicFile::commit`] leaves the target untouched (the temporary
//! file is deleted on drop; after a kill a `.NAME.tmp*` file may remain beside it, never a
//! half-written target).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// A file being written; it appears at its path only when committed.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    path: PathBuf,
    out: BufWriter<NamedTempFile>,
}

impl AtomicFile {
    /// Start writing `path` (through a temporary file in the same folder).
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(path, e))?;
        Ok(AtomicFile { path: path.to_path_buf(), out: BufWriter::with_capacity(1 << 20, tmp) })
    }

    /// The target path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Append bytes.
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::io(&self.path, e))
    }

    /// Flush, fsync and rename into place.
    pub(crate) fn commit(self) -> Result<()> {
        let path = self.path;
        let tmp = self.out.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
        tmp.as_file().sync_all().map_err(|e| Error::io(&path, e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Make the rename durable; not every platform can open a folder, which is fine.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Write a whole file atomically.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// Copy a file atomically.
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(|e| Error::io(from, e))?;
    let mut f = AtomicFile::create(to)?;
    std::io::copy(&mut src, &mut f.out).map_err(|e| Error::io(to, e))?;
    f.commit()
}
