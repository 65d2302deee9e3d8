//! The store's directory: the lock that keeps it to one process, what an earlier run left in
//! `tmp/`, the whole files it holds, and room taken on disk ahead of a download.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::file::Meta;

/// The whole stored files in `dir`, oldest first; others (truncated, foreign) are deleted.
pub(super) fn stored(dir: &Path) -> Vec<(PathBuf, Meta)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != super::file::EXTENSION) {
            continue;
        }
        let read = File::open(&path).and_then(|f| Ok((super::file::read(&f)?, f.metadata()?)));
        match read {
            Ok((meta, metadata)) => {
                let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((modified, path, meta));
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "not a whole stored recording; deleted");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    found.sort_by_key(|(modified, _, _)| *modified);
    found.into_iter().map(|(_, p, m)| (p, m)).collect()
}

/// The directory for this process alone: an exclusive lock on `dir/lock`, held while the store
/// is open. A second gateway pointed at the same directory would clear the first one's
/// downloads under way at start-up and evict files the first still indexes, so it is refused
/// (and passes audio through) instead; the kernel drops the lock when a process exits, however
/// it ends.
pub(super) fn claim(dir: &Path) -> Result<File, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .map_err(|e| e.to_string())?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another process holds {} (each gateway needs a directory of its own)",
            dir.join(LOCK).display()
        )),
        Err(std::fs::TryLockError::Error(error)) => Err(error.to_string()),
    }
}

/// The lock file in a store's directory; not a recording, so never indexed or deleted.
const LOCK: &str = "lock";

/// Delete what an earlier run left in the temporary directory.
pub(super) fn clear(tmp: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(tmp)?.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(())
}

/// Allocate `len` bytes of `file` on disk now, so that writing them cannot run out of room;
/// a file system that cannot allocate ahead writes as it comes.
pub(super) fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}
