//! Atomic file writes: a temporary file in the target folder, fsync, rename.
//!
//! A failure or a kill before [`AtomicFile::commit`] leaves the target untouched (the temporary
//! file is deleted on drop; after a kill a `.NAME.tmp*` file may remain beside it, never a
//! half-written target).
//!
//! The bytes are written by a writer thread, so that encoding the next bytes overlaps writing the
//! previous ones. They travel in buffers of [`BUFFER`] bytes (never zeroed again after the first
//! use), of which at most [`BUFFERS`] exist
//! per file (one being filled, the others queued or being written, then recycled): the memory in
//! flight is bounded, whatever the size of the file. A slice of a buffer or more is written by the
//! caller itself once the queue is empty, so a raw copy from a memory map is not copied twice.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// Bytes per buffer handed to the writer thread (about a core's L2 cache).
pub(crate) const BUFFER: usize = 1 << 20;
/// Buffers per file at most (filled, queued, being written).
const BUFFERS: usize = 8;

/// The writer thread's side: queued buffers (and how many of their bytes to write) in, written
/// buffers back. Buffers keep their full length, so that filling one never zeroes it first.
#[derive(Debug)]
struct Writer {
    full: Sender<(Vec<u8>, usize)>,
    free: Receiver<Vec<u8>>,
    /// Buffers that exist (at most [`BUFFERS`]).
    allocated: usize,
    /// Buffers sent and not yet back.
    in_flight: usize,
    /// Written buffers back from the thread, ready to fill.
    spare: Vec<Vec<u8>>,
    thread: JoinHandle<std::io::Result<()>>,
}

/// A file being written; it appears at its path only when committed.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    path: PathBuf,
    /// The buffer being filled ([`BUFFER`] bytes long) and the bytes of it in use.
    buf: Vec<u8>,
    used: usize,
    file: Option<Arc<NamedTempFile>>,
    writer: Option<Writer>,
}

/// A temporary file beside `path`, with the permissions a new file would get.
fn temp_beside(path: &Path) -> Result<NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // A temporary file is private (0600) by default; the finished file gets the usual
    // permissions of a new file (0666 less the umask), as `File::create` would give it.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(&dir).map_err(|e| Error::io(path, e))
}

/// fsync a finished temporary file, rename it to `path` and make the rename durable.
fn persist(tmp: NamedTempFile, path: &Path) -> Result<()> {
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Not every platform can open a folder, which is fine.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn finished(path: &Path) -> Error {
    Error::io(path, std::io::Error::other("the file was already finished"))
}

impl AtomicFile {
    /// Start writing `path` (through a temporary file in the same folder).
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let file = Arc::new(temp_beside(path)?);
        let (full_tx, full_rx) = channel::<(Vec<u8>, usize)>();
        let (free_tx, free_rx) = channel::<Vec<u8>>();
        let out = Arc::clone(&file);
        let thread = std::thread::Builder::new()
            .name("lora-io-writer".into())
            .spawn(move || {
                for (b, used) in full_rx {
                    out.as_file().write_all(&b[..used])?;
                    // The main side may be gone (dropped after an error); the buffer is freed then.
                    let _ = free_tx.send(b);
                }
                Ok(())
            })
            .map_err(|e| Error::io(path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            buf: vec![0; BUFFER],
            used: 0,
            file: Some(file),
            writer: Some(Writer {
                full: full_tx,
                free: free_rx,
                allocated: 1,
                in_flight: 0,
                spare: Vec::new(),
                thread,
            }),
        })
    }

    /// The target path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Append bytes. A slice of a buffer or more (a tensor copied raw from a memory map) is
    /// written straight from the caller's memory, after the queued buffers, without a copy.
    pub(crate) fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        if bytes.len() >= BUFFER {
            if self.used > 0 {
                self.send()?;
            }
            self.drain()?;
            let file = self.file.as_ref().ok_or_else(|| finished(&self.path))?;
            return file.as_file().write_all(bytes).map_err(|e| Error::io(&self.path, e));
        }
        while !bytes.is_empty() {
            if self.used == BUFFER {
                self.send()?;
            }
            let n = bytes.len().min(BUFFER - self.used);
            self.buf[self.used..self.used + n].copy_from_slice(&bytes[..n]);
            self.used += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Append `len` bytes produced in place by `fill(out, offset)`: `out` is the next piece of the
    /// output (a whole number of `width`-byte elements) and `offset` its byte offset within the
    /// `len` bytes. Nothing is copied: `fill` writes straight into the buffer the writer thread
    /// writes out.
    pub(crate) fn fill(&mut self, len: usize, width: usize, mut fill: impl FnMut(&mut [u8], usize)) -> Result<()> {
        debug_assert!(width > 0 && len % width == 0 && width <= BUFFER);
        let mut done = 0;
        while done < len {
            let room = (BUFFER - self.used) / width * width;
            if room == 0 {
                self.send()?;
                continue;
            }
            let n = room.min(len - done);
            fill(&mut self.buf[self.used..self.used + n], done);
            self.used += n;
            done += n;
        }
        Ok(())
    }

    /// Hand the current buffer to the writer thread and take an empty one: a written one, a new
    /// one while fewer than [`BUFFERS`] exist, else wait for the writer to finish one.
    fn send(&mut self) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| finished(&self.path))?;
        while let Ok(b) = w.free.try_recv() {
            w.in_flight -= 1;
            w.spare.push(b);
        }
        let next = match w.spare.pop() {
            Some(b) => b,
            None if w.allocated < BUFFERS => {
                w.allocated += 1;
                vec![0; BUFFER]
            }
            None => match w.free.recv() {
                Ok(b) => {
                    w.in_flight -= 1;
                    b
                }
                Err(_) => return Err(self.writer_error()),
            },
        };
        let full = std::mem::replace(&mut self.buf, next);
        let used = std::mem::take(&mut self.used);
        let w = self.writer.as_mut().ok_or_else(|| finished(&self.path))?;
        if w.full.send((full, used)).is_err() {
            return Err(self.writer_error());
        }
        w.in_flight += 1;
        Ok(())
    }

    /// Wait until every queued buffer is written.
    fn drain(&mut self) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| finished(&self.path))?;
        while w.in_flight > 0 {
            match w.free.recv() {
                Ok(b) => {
                    w.in_flight -= 1;
                    w.spare.push(b);
                }
                Err(_) => return Err(self.writer_error()),
            }
        }
        Ok(())
    }

    /// The error that stopped the writer thread (it stops only on one, or when told to).
    fn writer_error(&mut self) -> Error {
        let Some(w) = self.writer.take() else { return finished(&self.path) };
        drop(w.full);
        match w.thread.join() {
            Ok(Err(e)) => Error::io(&self.path, e),
            Ok(Ok(())) => Error::io(&self.path, std::io::Error::other("the writer thread stopped early")),
            Err(_) => Error::io(&self.path, std::io::Error::other("the writer thread panicked")),
        }
    }

    /// Write what is left, fsync and rename into place.
    pub(crate) fn commit(mut self) -> Result<()> {
        if self.used > 0 {
            self.send()?;
        }
        let w = self.writer.take().ok_or_else(|| finished(&self.path))?;
        drop(w.full);
        match w.thread.join() {
            Ok(r) => r.map_err(|e| Error::io(&self.path, e))?,
            Err(_) => return Err(Error::io(&self.path, std::io::Error::other("the writer thread panicked"))),
        }
        let file = self.file.take().ok_or_else(|| finished(&self.path))?;
        let tmp = Arc::into_inner(file)
            .ok_or_else(|| Error::io(&self.path, std::io::Error::other("the writer thread still holds the file")))?;
        persist(tmp, &self.path)
    }
}

impl Drop for AtomicFile {
    /// An unfinished file: stop the writer and wait for it, so that the temporary file is gone
    /// when this returns.
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w.full);
            let _ = w.thread.join();
        }
    }
}

/// Write a whole file atomically.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.as_file_mut().write_all(bytes).map_err(|e| Error::io(path, e))?;
    persist(tmp, path)
}

/// Copy a file atomically (in the kernel where the platform can).
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(|e| Error::io(from, e))?;
    let mut tmp = temp_beside(to)?;
    std::io::copy(&mut src, tmp.as_file_mut()).map_err(|e| Error::io(to, e))?;
    persist(tmp, to)
}
