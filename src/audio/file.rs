//! One stored recording on disk: a fixed-size header (what it is and how it is served) and
//! then the box's bytes, so a `Range` is one positioned read. Files are written under `tmp/`
//! and renamed into place only when complete, so a file in the store's directory is whole.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The header's first bytes: the format and its version.
const MAGIC: &[u8; 5] = b"MGWA\x01";

/// The body starts here; the header (magic, length, JSON) is padded to it, so it can be
/// written again with the final length once a download without `Content-Length` is complete.
pub const BODY_OFFSET: u64 = 4096;

/// A stored file's name ends with this; anything else in the directory is not the store's.
pub const EXTENSION: &str = "audio";

/// What a stored recording is: its key and the headers it is served with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub account: String,
    pub queue_call_id: u64,
    /// Body bytes; `None` while a download without `Content-Length` is under way.
    pub length: Option<u64>,
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    pub cache_control: Option<String>,
    /// The box's entity tag, or one made from the id and length.
    pub etag: String,
    /// Unix seconds: the box's `Last-Modified`, or when the download began.
    pub last_modified: u64,
}

impl Meta {
    pub fn last_modified(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(self.last_modified)
    }

    /// The header block written at offset 0, or `None` when the metadata does not fit in it
    /// (such a recording is served, not stored).
    pub fn header(&self) -> Option<Vec<u8>> {
        let json = serde_json::to_vec(self).ok()?;
        let mut header = Vec::with_capacity(BODY_OFFSET as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&u32::try_from(json.len()).ok()?.to_le_bytes());
        header.extend_from_slice(&json);
        if header.len() as u64 > BODY_OFFSET {
            return None;
        }
        header.resize(BODY_OFFSET as usize, 0);
        Some(header)
    }
}

/// Read the header of a stored file, checking that the file holds exactly the body it
/// announces.
pub fn read(file: &File) -> io::Result<Meta> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut start = [0u8; 9];
    file.read_exact_at(&mut start, 0)?;
    if &start[..5] != MAGIC {
        return Err(invalid("not a stored recording"));
    }
    let length = u32::from_le_bytes([start[5], start[6], start[7], start[8]]) as u64;
    if 9 + length > BODY_OFFSET {
        return Err(invalid("header too long"));
    }
    let mut json = vec![0u8; length as usize];
    file.read_exact_at(&mut json, 9)?;
    let meta: Meta = serde_json::from_slice(&json).map_err(|_| invalid("unreadable header"))?;
    let size = file.metadata()?.len();
    if meta.length.map(|l| BODY_OFFSET + l) != Some(size) {
        return Err(invalid("truncated"));
    }
    Ok(meta)
}

/// A name no other file of this store has: the id and a value unique to this process's
/// life and its start time.
pub fn unique_name(queue_call_id: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{queue_call_id}-{:x}-{n:x}.{EXTENSION}",
        started ^ u64::from(std::process::id())
    )
}

/// The temporary directory downloads are written in, inside the store's directory (so the
/// rename into place never crosses file systems).
pub fn tmp_dir(dir: &Path) -> PathBuf {
    dir.join("tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(length: Option<u64>) -> Meta {
        Meta {
            account: "greenbox".into(),
            queue_call_id: 47610,
            length,
            content_type: Some("audio/mpeg".into()),
            content_disposition: None,
            cache_control: None,
            etag: "\"mgw-47610-3\"".into(),
            last_modified: 1_700_000_000,
        }
    }

    #[test]
    fn a_file_reads_back_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.audio");
        let mut bytes = meta(Some(3)).header().unwrap();
        bytes.extend_from_slice(b"abc");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&File::open(&path).unwrap()).unwrap(), meta(Some(3)));

        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read(&File::open(&path).unwrap()).is_err(), "truncated");
        let mut unknown = meta(None).header().unwrap();
        unknown.extend_from_slice(b"abc");
        std::fs::write(&path, &unknown).unwrap();
        assert!(
            read(&File::open(&path).unwrap()).is_err(),
            "never completed"
        );
        std::fs::write(&path, b"something else entirely").unwrap();
        assert!(read(&File::open(&path).unwrap()).is_err());
    }

    #[test]
    fn metadata_that_does_not_fit_is_not_stored() {
        let mut big = meta(Some(1));
        big.content_disposition = Some("x".repeat(5000));
        assert_eq!(big.header(), None);
        assert_ne!(unique_name(1), unique_name(1));
    }
}
