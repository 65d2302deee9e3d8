//! The rest of a download the disk refused: kept in memory for the clients following it.
//!
//! A recording whose length the box announced has its whole room taken before its first byte,
//! so a full disk refuses it at once: then all of it is kept in a [`Spill`] from byte 0, and
//! the clients waiting for it still share one download from the box. A chunked one cannot be
//! reserved: the disk may fill in the middle of it. From the byte the disk refused, the
//! download keeps what arrives in a spill, and every client following it reads the file up to
//! that byte and the spill after it, so nobody's answer breaks off. Such a recording is not
//! stored. At most [`SPILL_LIMIT`] bytes are held per download: a larger recording with a
//! length passes through to each client, a chunked one breaks off.

use std::sync::Mutex;

use bytes::Bytes;

/// The most a download keeps in memory once the disk refused it.
pub const SPILL_LIMIT: u64 = 8 * 1024 * 1024;

/// The body from byte [`Spill::from`] on, as it arrived.
#[derive(Debug)]
pub struct Spill {
    /// The first body byte that is not in the file.
    pub from: u64,
    /// Each piece with the body offset it starts at, in order and without gaps.
    pieces: Mutex<Vec<(u64, Bytes)>>,
}

impl Spill {
    pub fn new(from: u64) -> Self {
        Self {
            from,
            pieces: Mutex::new(Vec::new()),
        }
    }

    /// Keep `piece`, which starts at body offset `at` (where the last one ended); `false` when
    /// that would take the spill past [`SPILL_LIMIT`], and nothing is kept.
    pub fn push(&self, at: u64, piece: Bytes) -> bool {
        if at + piece.len() as u64 - self.from > SPILL_LIMIT {
            return false;
        }
        let mut pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(
            pieces.last().map_or(self.from, |(o, p)| o + p.len() as u64),
            at
        );
        pieces.push((at, piece));
        true
    }

    /// The bytes from body offset `position` (at or after [`Spill::from`]) up to `end`, from
    /// one piece; `None` if they have not arrived.
    pub fn read(&self, position: u64, end: u64) -> Option<Bytes> {
        let pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        let index = pieces
            .partition_point(|(at, _)| *at <= position)
            .checked_sub(1)?;
        let (at, piece) = &pieces[index];
        let start = usize::try_from(position - at).ok()?;
        let stop = usize::try_from(end.saturating_sub(*at))
            .unwrap_or(usize::MAX)
            .min(piece.len());
        (start < stop).then(|| piece.slice(start..stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_come_from_the_piece_that_holds_the_position() {
        let spill = Spill::new(100);
        assert!(spill.push(100, Bytes::from_static(b"abcd")));
        assert!(spill.push(104, Bytes::from_static(b"efgh")));
        assert_eq!(spill.read(100, 200).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(spill.read(102, 200).as_deref(), Some(&b"cd"[..]));
        assert_eq!(spill.read(105, 107).as_deref(), Some(&b"fg"[..]));
        // Not arrived yet, or before the spill.
        assert_eq!(spill.read(108, 200), None);
        assert_eq!(spill.read(99, 200), None);
    }

    #[test]
    fn a_spill_past_its_limit_keeps_nothing_more() {
        let spill = Spill::new(0);
        let piece = Bytes::from(vec![0u8; 1024 * 1024]);
        for n in 0..8 {
            assert!(spill.push(n * 1024 * 1024, piece.clone()));
        }
        assert!(!spill.push(SPILL_LIMIT, Bytes::from_static(b"x")));
        assert_eq!(spill.read(SPILL_LIMIT, SPILL_LIMIT + 1), None);
    }
}
