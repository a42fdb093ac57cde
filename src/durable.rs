//! Files that survive a crash or a power loss. A file is written under a temporary name
//! in its own folder, flushed to the disk (`fsync`), renamed over its target, and the
//! folder flushed too, so that the rename itself is on the disk: a reader finds the old
//! content or the new, never a mix, a truncated file or a zeroed hole.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `.NAME.tmp-PID` beside `path`: on the same file system, so the rename is atomic.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Flushes a written file's data and size to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Flushes a folder's entries (creations, renames, removals) to the disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Renames `from` over `to` (files or folders, one file system) and flushes the folders
/// of both.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(io(to))?;
    sync_dir(parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(parent(from))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` durably: temporary sibling, fsync, rename, fsync of the folder.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    rename(&tmp, path)
}

/// Moves a file that `write_with` created at a temporary sibling into place durably: for
/// writers that take a path (safetensors).
pub fn write_with(path: &Path, write_with: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(path);
    if let Err(e) = write_with(&tmp).and_then(|()| sync_file(&tmp)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    rename(&tmp, path)
}

/// Copies `from` to `to` durably.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(io(from))?;
    write(to, &bytes)
}
