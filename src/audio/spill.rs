//! The rest of a download the disk refused: kept in memory for the clients following it.
//!
//! A recording whose length the box announced has its whole room taken before its first byte,
//! so a full disk refuses it at once: then all of it is kept in a [`Spill`] from byte 0, and
//! the clients waiting for it still share one download from the box. A chunked one cannot be
//! reserved: the disk may fill in the middle of it. From the byte the disk refused, the
//! download keeps what arrives in a spill, and every client following it reads the file up to
//! that byte and the spill after it, so nobody's answer breaks off. Such a recording is not
//! stored.
//!
//! All spills together hold at most `cache.audio.max_memory_bytes` (the store's [`Budget`]),
//! whatever the box sends and however many downloads there are, so the process's memory bound
//! holds. A recording with a length that does not fit in what is left is not kept: the box's
//! answer goes to one client (see [`super::Handoff`]) and the others ask the box; a chunked one
//! that runs out of it breaks off, as it would without a spill.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The bytes all spills of one store hold, shared by them, and the most they may.
#[derive(Debug)]
pub struct Budget {
    held: AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Self {
            held: AtomicU64::new(0),
            limit,
        }
    }

    /// The most all spills may hold together.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Take `bytes` of the budget, if that many are left.
    fn take(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes held by spills now.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// The body from byte [`Spill::from`] on, as it arrived.
#[derive(Debug)]
pub struct Spill {
    /// The first body byte that is not in the file.
    pub from: u64,
    budget: Arc<Budget>,
    pieces: Mutex<Pieces>,
}

#[derive(Debug, Default)]
struct Pieces {
    /// Each piece with the body offset it starts at, in order and without gaps.
    list: Vec<(u64, Bytes)>,
    /// Bytes in `list`.
    held: u64,
    /// Bytes taken from the budget: at least `held`.
    taken: u64,
}

impl Spill {
    /// A spill from body byte `from` on, holding `reserve` bytes of the budget from the start
    /// (the rest of a recording whose length is known); `None` if the budget has no room.
    pub fn new(from: u64, budget: Arc<Budget>, reserve: u64) -> Option<Self> {
        budget.take(reserve).then(|| Self {
            from,
            budget,
            pieces: Mutex::new(Pieces {
                taken: reserve,
                ..Pieces::default()
            }),
        })
    }

    /// Keep `piece`, which starts at body offset `at` (where the last one ended); `false` when
    /// the budget has no room for it, and nothing is kept.
    pub fn push(&self, at: u64, piece: Bytes) -> bool {
        let mut pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(self.from + pieces.held, at);
        let held = pieces.held + piece.len() as u64;
        if held > pieces.taken {
            if !self.budget.take(held - pieces.taken) {
                return false;
            }
            pieces.taken = held;
        }
        pieces.held = held;
        pieces.list.push((at, piece));
        true
    }

    /// The bytes from body offset `position` (at or after [`Spill::from`]) up to `end`, from
    /// one piece; `None` if they have not arrived.
    pub fn read(&self, position: u64, end: u64) -> Option<Bytes> {
        let pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        let list = &pieces.list;
        let index = list
            .partition_point(|(at, _)| *at <= position)
            .checked_sub(1)?;
        let (at, piece) = &list[index];
        let start = usize::try_from(position - at).ok()?;
        let stop = usize::try_from(end.saturating_sub(*at))
            .unwrap_or(usize::MAX)
            .min(piece.len());
        (start < stop).then(|| piece.slice(start..stop))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let taken = self
            .pieces
            .get_mut()
            .map_or_else(|e| e.into_inner().taken, |p| p.taken);
        self.budget.give_back(taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_come_from_the_piece_that_holds_the_position() {
        let spill = Spill::new(100, Arc::new(Budget::new(1024)), 0).unwrap();
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
    fn all_spills_together_stay_within_the_budget_and_give_it_back() {
        const LIMIT: u64 = 16 * 1024 * 1024;
        let budget = Arc::new(Budget::new(LIMIT));
        let mib = Bytes::from(vec![0u8; 1024 * 1024]);
        // One recording of a known 10 MiB holds its room from the start.
        let known = Spill::new(0, budget.clone(), 10 * 1024 * 1024).unwrap();
        assert!(known.push(0, mib.clone()));
        assert_eq!(budget.held(), 10 * 1024 * 1024);
        // Another of 10 MiB does not fit beside it.
        assert!(Spill::new(0, budget.clone(), 10 * 1024 * 1024).is_none());
        // A chunked one grows until the budget is spent.
        let chunked = Spill::new(0, budget.clone(), 0).unwrap();
        for n in 0..6 {
            assert!(chunked.push(n * 1024 * 1024, mib.clone()));
        }
        assert!(!chunked.push(6 * 1024 * 1024, Bytes::from_static(b"x")));
        assert_eq!(budget.held(), LIMIT);
        drop(known);
        drop(chunked);
        assert_eq!(budget.held(), 0);
    }
}
