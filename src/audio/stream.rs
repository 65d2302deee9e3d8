//! A stored recording's body, read from its file a chunk at a time: a whole file, or one that
//! a download is still writing, where the reader waits for the bytes it needs and breaks off
//! if the download does. Bytes the disk refused come from the download's [`Spill`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::Progress;
use super::file::BODY_OFFSET;
use super::spill::Spill;

/// Bytes read from the file per chunk.
const CHUNK: u64 = 64 * 1024;

/// A chunk of the body, with whether it came from the download's spill (memory), not the file.
type Chunk = io::Result<(Bytes, bool)>;

/// Body bytes `start..end` of a recording's file.
pub struct FileStream {
    inner: Pin<Box<dyn Stream<Item = Chunk> + Send>>,
    remaining: Option<u64>,
    from_memory: bool,
}

struct Reader {
    file: Arc<File>,
    position: u64,
    /// `None` until a download without `Content-Length` is complete.
    end: Option<u64>,
    /// The download writing the file, if it is not complete.
    progress: Option<watch::Receiver<Progress>>,
    /// The part of the body the disk refused, once it did.
    spill: Option<Arc<Spill>>,
    failed: bool,
}

impl FileStream {
    pub fn new(
        file: Arc<File>,
        start: u64,
        end: Option<u64>,
        progress: Option<watch::Receiver<Progress>>,
    ) -> Self {
        let reader = Reader {
            file,
            position: start,
            end,
            progress,
            spill: None,
            failed: false,
        };
        let inner = futures_util::stream::unfold(reader, |mut reader| async move {
            if reader.failed {
                return None;
            }
            match reader.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), reader)),
                Ok(None) => None,
                Err(error) => {
                    reader.failed = true;
                    Some((Err(error), reader))
                }
            }
        });
        Self {
            inner: Box::pin(inner),
            remaining: end.map(|end| end - start),
            from_memory: false,
        }
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        self.remaining
    }

    /// Whether the chunk returned last came from memory (the part the disk refused), not the file.
    pub fn last_from_memory(&self) -> bool {
        self.from_memory
    }
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<(Bytes, bool)>> {
        let available = self.available().await?;
        let limit = self.end.unwrap_or(available).min(available);
        if self.position >= limit {
            return Ok(None);
        }
        if let Some(spill) = self.spill.as_ref().filter(|s| self.position >= s.from) {
            let piece = spill
                .read(self.position, limit)
                .ok_or_else(|| io::Error::other("the download's spilled bytes are missing"))?;
            self.position += piece.len() as u64;
            return Ok(Some((piece, true)));
        }
        let limit = self.spill.as_ref().map_or(limit, |s| limit.min(s.from));
        let size = CHUNK.min(limit - self.position);
        let (file, offset) = (self.file.clone(), BODY_OFFSET + self.position);
        let chunk = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; size as usize];
            file.read_exact_at(&mut buffer, offset).map(|()| buffer)
        })
        .await
        .map_err(io::Error::other)??;
        self.position += size;
        Ok(Some((Bytes::from(chunk), false)))
    }

    /// How many body bytes the file holds that may be read now: waits while the download has
    /// not written past `position`.
    async fn available(&mut self) -> io::Result<u64> {
        let Some(progress) = &mut self.progress else {
            return Ok(u64::MAX);
        };
        loop {
            let state = progress.borrow_and_update().clone();
            match state {
                Progress::Writing { written, spill, .. } if written > self.position => {
                    self.spill = spill;
                    return Ok(written);
                }
                Progress::Complete { meta, spill, .. } => {
                    self.spill = spill;
                    let length = meta.length.unwrap_or(0);
                    self.end = Some(self.end.unwrap_or(length).min(length));
                    self.progress = None;
                    return Ok(length);
                }
                Progress::Broken(reason) => return Err(io::Error::other(reason)),
                Progress::Asking | Progress::Writing { .. } => {
                    if progress.changed().await.is_err() {
                        return Err(io::Error::other("the download stopped"));
                    }
                }
                _ => return Err(io::Error::other("the download gave no body")),
            }
        }
    }
}

impl Stream for FileStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok((chunk, from_memory)))) = &polled {
            self.from_memory = *from_memory;
            if let Some(remaining) = &mut self.remaining {
                *remaining = remaining.saturating_sub(chunk.len() as u64);
            }
        }
        polled.map(|item| item.map(|chunk| chunk.map(|(bytes, _)| bytes)))
    }
}
