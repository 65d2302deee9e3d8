//! The box's answer to a download the store could not keep (no room on disk, nor in the memory
//! for such downloads): handed, unread, to one client that wants the whole recording, so the
//! box's first copy is not thrown away. Everyone else asks the box, as without a store.

use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// The unread answer and the account's audio stream slot it holds, for the first taker.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<(reqwest::Response, OwnedSemaphorePermit)>>>);

impl Handoff {
    pub fn new(response: reqwest::Response, permit: OwnedSemaphorePermit) -> Self {
        Self(Arc::new(Mutex::new(Some((response, permit)))))
    }

    /// The answer, to the first caller only.
    pub fn take(&self) -> Option<(reqwest::Response, OwnedSemaphorePermit)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff").finish_non_exhaustive()
    }
}
