//! The preprocessed cache for multi-epoch runs: the image ranks store each sample's
//! decoded, centre-square, resized pixels (uint8) in a memory-mapped file on first use and
//! read them from there afterwards, skipping the decode. Random crops still apply on top
//! of the cached square.
//!
//! One cache serves all image ranks of a process (rank threads share it); slots are
//! handed out in first-come order and keyed by the sample's identity. A process holds its
//! file under an advisory lock: a second process that opens it is refused (truncating a
//! file another process has mapped would kill that process with SIGBUS). Under a launcher
//! every process names its own file (see `train`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::MmapMut;

use crate::error::{Error, Result};

pub struct ImageCache {
    path: PathBuf,
    /// Holds the lock while the map lives.
    _file: std::fs::File,
    /// Pixels per side of a cached square.
    pub side: usize,
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    slots: HashMap<String, usize>,
    map: MmapMut,
    hits: u64,
    misses: u64,
}

impl ImageCache {
    /// A cache file of `capacity` squares of `side × side × 3` bytes at `path` (created or
    /// overwritten: its contents are only valid for this run's slot table).
    pub fn create(path: &Path, side: usize, capacity: usize) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::File {
                    path: path.to_path_buf(),
                    message: "the image cache file is in use by another process: each run (and \
                              each process of a run) needs its own data.cache"
                        .into(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let bytes = (capacity.max(1) * side * side * 3) as u64;
        file.set_len(0)
            .and_then(|()| file.set_len(bytes))
            .map_err(io)?;
        // SAFETY: the file is ours for the run (locked, and emptied above); nothing else
        // maps or resizes it while the map lives.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        Ok(ImageCache {
            path: path.to_path_buf(),
            _file: file,
            side,
            capacity,
            state: Mutex::new(State {
                slots: HashMap::new(),
                map,
                hits: 0,
                misses: 0,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bytes(&self) -> usize {
        self.side * self.side * 3
    }

    /// The cached square of `key`, if stored.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut s = self.state.lock().expect("cache lock");
        let n = self.bytes();
        let slot = s.slots.get(key).copied();
        match slot {
            Some(slot) => {
                s.hits += 1;
                Some(s.map[slot * n..(slot + 1) * n].to_vec())
            }
            None => {
                s.misses += 1;
                None
            }
        }
    }

    /// Stores `rgb` (`side × side × 3`) for `key`; a full cache stores nothing more.
    pub fn put(&self, key: &str, rgb: &[u8]) {
        let n = self.bytes();
        if rgb.len() != n {
            return;
        }
        let mut s = self.state.lock().expect("cache lock");
        if s.slots.contains_key(key) || s.slots.len() >= self.capacity {
            return;
        }
        let slot = s.slots.len();
        s.map[slot * n..(slot + 1) * n].copy_from_slice(rgb);
        s.slots.insert(key.to_string(), slot);
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        let s = self.state.lock().expect("cache lock");
        (s.hits, s.misses)
    }
}
