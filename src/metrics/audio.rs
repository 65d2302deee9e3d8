//! The audio store's series: per account, requests answered from disk or not and the bytes
//! sent from disk (or from memory, where the disk refused a download); for the store, its size, bound, stored downloads and failed writes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

/// Every audio store series.
#[derive(Debug, Default)]
pub struct AudioMetrics {
    hits: Family<AccountLabels, Counter>,
    misses: Family<AccountLabels, Counter>,
    disk_bytes: Family<AccountLabels, Counter>,
    memory_bytes: Family<AccountLabels, Counter>,
    store: AudioStoreMetrics,
}

/// The store's own series, kept current by the store.
#[derive(Debug, Clone, Default)]
pub struct AudioStoreMetrics {
    pub bytes: Gauge,
    pub files: Gauge,
    pub max_bytes: Gauge,
    pub downloads_stored: Counter,
    /// Downloads the store could not write (a full disk?): passed on without being stored.
    pub store_failures: Counter,
}

/// One account's audio store counters, resolved once.
#[derive(Debug, Clone, Default)]
pub struct AccountAudio {
    pub hits: Counter,
    pub misses: Counter,
    pub disk_bytes: Counter,
    /// Bytes of downloads the disk refused, sent from the memory that kept them instead.
    pub memory_bytes: Counter,
}

impl AudioMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "audio_cache_hits",
            "Audio requests answered from a recording stored on disk",
            self.hits.clone(),
        );
        registry.register(
            "audio_cache_misses",
            "Audio requests for a recording not yet stored: they started or joined its download from the box",
            self.misses.clone(),
        );
        registry.register_with_unit(
            "audio_disk",
            "Audio bytes sent to clients from the store's files (stored ones and downloads being written)",
            Unit::Bytes,
            self.disk_bytes.clone(),
        );
        registry.register_with_unit(
            "audio_memory",
            "Audio bytes sent to clients from memory: the part of a download the store could not write to disk, kept for the clients following it",
            Unit::Bytes,
            self.memory_bytes.clone(),
        );
        registry.register_with_unit(
            "audio_store",
            "Bytes of the recordings in the audio store",
            Unit::Bytes,
            self.store.bytes.clone(),
        );
        registry.register(
            "audio_store_files",
            "Recordings in the audio store",
            self.store.files.clone(),
        );
        registry.register_with_unit(
            "audio_store_max",
            "The audio store's bound (cache.audio.max_bytes)",
            Unit::Bytes,
            self.store.max_bytes.clone(),
        );
        registry.register(
            "audio_store_downloads",
            "Recordings downloaded from the box and stored",
            self.store.downloads_stored.clone(),
        );
        registry.register(
            "audio_store_write_failures",
            "Downloads the audio store could not write to disk (a full disk?), passed on to their clients without being stored",
            self.store.store_failures.clone(),
        );
    }

    pub fn store(&self) -> AudioStoreMetrics {
        self.store.clone()
    }

    pub fn account(&self, account: &str) -> AccountAudio {
        let labels = AccountLabels {
            account: account.to_owned(),
        };
        AccountAudio {
            hits: self.hits.get_or_create(&labels).clone(),
            misses: self.misses.get_or_create(&labels).clone(),
            disk_bytes: self.disk_bytes.get_or_create(&labels).clone(),
            memory_bytes: self.memory_bytes.get_or_create(&labels).clone(),
        }
    }
}
