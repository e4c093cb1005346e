//! Disk usage of the data directory's file system, refreshed by a timer and
//! after every new chunk, read by the write path as one atomic load.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How often the disk usage is refreshed in the background.
pub const DISK_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Last known usage of the file system holding the data directory.
#[derive(Debug, Default)]
pub struct DiskMonitor {
    limit_percent: u8,
    used_bytes: AtomicU64,
    total_bytes: AtomicU64,
    /// Bytes of uploaded chunks held locally: evicted before writes are shed.
    reclaimable: AtomicU64,
    over: AtomicBool,
}

/// A snapshot of [`DiskMonitor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes in use (as `df` counts them: total minus free).
    pub used_bytes: u64,
    /// Bytes usable by this process (used plus available to non-root).
    pub total_bytes: u64,
    /// Used, in percent of total, rounded up.
    pub used_percent: u8,
}

impl DiskUsage {
    fn percent(&self) -> u8 {
        if self.total_bytes == 0 {
            0
        } else {
            (self.used_bytes * 100).div_ceil(self.total_bytes).min(100) as u8
        }
    }
}

impl DiskMonitor {
    /// A monitor that reports "over" above `limit_percent`.
    pub fn new(limit_percent: u8) -> Self {
        Self {
            limit_percent,
            ..Self::default()
        }
    }

    /// The configured high-water mark.
    pub fn limit_percent(&self) -> u8 {
        self.limit_percent
    }

    /// Reads the file system's usage now.
    pub fn refresh(&self, dir: &Path) -> std::io::Result<DiskUsage> {
        let st = rustix::fs::statvfs(dir)?;
        let frsize = st.f_frsize.max(1);
        let used = st.f_blocks.saturating_sub(st.f_bfree) * frsize;
        let total = used + st.f_bavail * frsize;
        self.used_bytes.store(used, Ordering::Relaxed);
        self.total_bytes.store(total, Ordering::Relaxed);
        let usage = self.usage();
        let after_eviction = DiskUsage {
            used_bytes: used.saturating_sub(self.reclaimable.load(Ordering::Relaxed)),
            ..usage
        };
        self.over.store(
            after_eviction.percent() > self.limit_percent,
            Ordering::Relaxed,
        );
        Ok(usage)
    }

    /// The last reading with the high-water mark, as nodes report it.
    pub fn status(&self) -> chunkbus_client::DiskStatus {
        let usage = self.usage();
        chunkbus_client::DiskStatus {
            used_bytes: usage.used_bytes,
            total_bytes: usage.total_bytes,
            used_percent: usage.used_percent,
            high_water_percent: self.limit_percent(),
        }
    }

    /// The last reading.
    pub fn usage(&self) -> DiskUsage {
        let mut u = DiskUsage {
            used_bytes: self.used_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            used_percent: 0,
        };
        u.used_percent = u.percent();
        u
    }

    /// True when the last reading is above the mark, evictable bytes included.
    pub fn above_limit(&self) -> bool {
        self.usage().used_percent > self.limit_percent
    }

    /// Bytes of uploaded chunks still held locally grew by `n`.
    pub fn add_reclaimable(&self, n: u64) {
        self.reclaimable.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes of uploaded chunks still held locally shrank by `n`.
    pub fn sub_reclaimable(&self, n: u64) {
        let _ = self
            .reclaimable
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(n))
            });
    }

    /// Bytes of uploaded chunks still held locally.
    pub fn reclaimable(&self) -> u64 {
        self.reclaimable.load(Ordering::Relaxed)
    }

    /// True when the last reading was above the high-water mark even after
    /// every uploaded chunk held locally would be evicted.
    pub fn over_high_water(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let all = DiskMonitor::new(100);
        let u = all.refresh(dir.path()).unwrap();
        assert!(u.total_bytes > 0 && u.used_bytes <= u.total_bytes);
        assert!(!all.over_high_water());
        let none = DiskMonitor::new(1);
        let u = none.refresh(dir.path()).unwrap();
        assert_eq!(none.over_high_water(), u.used_percent > 1);
    }
}
