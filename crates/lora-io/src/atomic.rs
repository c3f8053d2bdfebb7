//! Atomic file writes: a temporary file in the target folder, fsync, rename; and
//! [`rename_into_place`], which publishes a finished file or folder in one step.
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
//! Every [`WRITEBACK_STEP`] bytes the writer asks the kernel to start writing the file to the
//! disk ([`start_writeback`]), so that the final fsync has little left to wait for.
//!
//! Debug builds (never release builds) honour `LORA_IO_FAIL_AFTER_BYTES=N`: once N bytes have
//! gone through the writers of this process, the next write fails as a full disk would. Tests use
//! it where they cannot mount a small file system.

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

/// Bytes written between two calls of [`start_writeback`] by the writer thread.
const WRITEBACK_STEP: usize = 8 * BUFFER;

/// Ask the kernel to start writing the file's dirty pages to the disk now, without waiting for
/// it (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, Linux only; elsewhere nothing). Linux
/// starts writing dirty pages on its own only past a share of the memory (10% by default), so a
/// file of a few hundred MiB would otherwise reach the disk only in [`persist`]'s fsync, after
/// everything else: started as the bytes come, the disk works while the next tensors are
/// computed. `lora merge` of the issue-5 bench model spent 0.28 s of about 0.8 s in that fsync
/// (docs/benchmarks.md, "Session 10"). Advisory: errors are ignored here, the fsync reports
/// them.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open file descriptor that `file` owns for the call's
    // duration; offset 0 and length 0 name the whole file; no memory is passed.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

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
    sync_parent(path);
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
                let mut since_writeback = 0;
                for (b, used) in full_rx {
                    out.as_file().write_all(&b[..used])?;
                    since_writeback += used;
                    if since_writeback >= WRITEBACK_STEP {
                        start_writeback(out.as_file());
                        since_writeback = 0;
                    }
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
        injected_fault(bytes.len()).map_err(|e| Error::io(&self.path, e))?;
        if bytes.len() >= BUFFER {
            if self.used > 0 {
                self.send()?;
            }
            self.drain()?;
            let file = self.file.as_ref().ok_or_else(|| finished(&self.path))?;
            file.as_file().write_all(bytes).map_err(|e| Error::io(&self.path, e))?;
            start_writeback(file.as_file());
            return Ok(());
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
    /// `len` bytes; an error from `fill` stops the file. Nothing is copied: `fill` writes
    /// straight into the buffer the writer thread writes out.
    pub(crate) fn fill(
        &mut self,
        len: usize,
        width: usize,
        mut fill: impl FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        debug_assert!(width > 0 && len % width == 0 && width <= BUFFER);
        injected_fault(len).map_err(|e| Error::io(&self.path, e))?;
        let mut done = 0;
        while done < len {
            let room = (BUFFER - self.used) / width * width;
            if room == 0 {
                self.send()?;
                continue;
            }
            let n = room.min(len - done);
            fill(&mut self.buf[self.used..self.used + n], done)?;
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
    injected_fault(bytes.len()).map_err(|e| Error::io(path, e))?;
    tmp.as_file_mut().write_all(bytes).map_err(|e| Error::io(path, e))?;
    persist(tmp, path)
}

/// Copy a file atomically (in the kernel where the platform can).
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(|e| Error::io(from, e))?;
    let mut tmp = temp_beside(to)?;
    let len = src.metadata().map_err(|e| Error::io(from, e))?.len();
    injected_fault(usize::try_from(len).unwrap_or(usize::MAX)).map_err(|e| Error::io(to, e))?;
    std::io::copy(&mut src, tmp.as_file_mut()).map_err(|e| Error::io(to, e))?;
    persist(tmp, to)
}

/// Make a rename in `path`'s folder durable; not every platform can open a folder, which is fine.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// What [`rename_into_place`] does when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Fail with an [`std::io::ErrorKind::AlreadyExists`] error, even when the target appears
    /// while the output was being written.
    Refuse,
    /// Replace it; the old target stays whole at its path until the new one takes its place.
    Replace,
}

/// Publish a finished file or folder `staged` at `target` (both in the same folder) in one step:
/// a reader sees the old target or the new one, never a mix or nothing.
///
/// On Linux a folder replaces a folder with one `renameat2(RENAME_EXCHANGE)`, and
/// [`Existing::Refuse`] uses `RENAME_NOREPLACE`, so two processes racing for the same target
/// cannot overwrite each other. Elsewhere (or on a file system without these flags) a file
/// replaces a file with one `rename`, and a folder is moved aside, the new one renamed in, the old
/// one removed: a kill between the two renames leaves the old folder beside the target as
/// `.NAME.lora-old-PID`.
pub fn rename_into_place(staged: &Path, target: &Path, existing: Existing) -> Result<()> {
    let io = |e| Error::io(target, e);
    for _ in 0..3 {
        match rename_noreplace(staged, target) {
            Ok(()) => {
                sync_parent(target);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && existing == Existing::Replace => {}
            Err(e) => return Err(io(e)),
        }
        let staged_is_dir = std::fs::symlink_metadata(staged).map_err(|e| Error::io(staged, e))?.is_dir();
        let target_is_dir = match std::fs::symlink_metadata(target) {
            Ok(m) => m.is_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        if !staged_is_dir && !target_is_dir {
            std::fs::rename(staged, target).map_err(io)?;
            sync_parent(target);
            return Ok(());
        }
        match exchange(staged, target) {
            Ok(()) => {
                sync_parent(target);
                // `staged` now holds the old output; the new one is in place whatever happens next.
                let _ = remove_path(staged);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return replace_aside(staged, target),
            Err(e) => return Err(io(e)),
        }
    }
    Err(io(std::io::Error::other("the target kept appearing and disappearing while it was being replaced")))
}

/// The portable replacement: move the old target aside, rename the new one in, remove the old.
fn replace_aside(staged: &Path, target: &Path) -> Result<()> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let old = target.with_file_name(format!(".{name}.lora-old-{}", std::process::id()));
    remove_path(&old).map_err(|e| Error::io(&old, e))?;
    std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    if let Err(e) = std::fs::rename(staged, target) {
        let _ = std::fs::rename(&old, target);
        return Err(Error::io(target, e));
    }
    sync_parent(target);
    let _ = remove_path(&old);
    Ok(())
}

/// Remove a file or a folder with its contents; a missing path is fine.
fn remove_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => portable_noreplace(from, to),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    portable_noreplace(from, to)
}

/// Rename unless the target exists (checked just before: a small window for a race).
fn portable_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the output exists"));
    }
    std::fs::rename(from, to)
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "no RENAME_EXCHANGE here"))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "no atomic exchange on this platform"))
}

/// The test hook of debug builds: `LORA_IO_FAIL_AFTER_BYTES=N` fails the write that would take
/// this process's written bytes past N, with the error a full disk gives.
#[cfg(debug_assertions)]
fn injected_fault(len: usize) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BUDGET: OnceLock<Option<AtomicU64>> = OnceLock::new();
    let budget = BUDGET.get_or_init(|| {
        std::env::var("LORA_IO_FAIL_AFTER_BYTES").ok().and_then(|v| v.parse::<u64>().ok()).map(AtomicU64::new)
    });
    let Some(left) = budget else { return Ok(()) };
    let len = len as u64;
    match left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(len)) {
        Ok(_) => Ok(()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left on device (injected by LORA_IO_FAIL_AFTER_BYTES)",
        )),
    }
}

#[cfg(not(debug_assertions))]
fn injected_fault(_: usize) -> std::io::Result<()> {
    Ok(())
}
