//! Test helpers.

use std::path::{Path, PathBuf};

use strata_snapshotter::{Mode, Mount, Snapshotter};

/// Panics unless root: the snapshotter mounts overlays.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (they mount overlays): run the suite as root"
    );
}

/// A scratch dir on the real disk.
pub fn scratch() -> tempfile::TempDir {
    std::fs::create_dir_all("/var/tmp").unwrap();
    tempfile::Builder::new()
        .prefix("strata-snap-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A store in `dir/root`.
pub fn open(dir: &Path) -> Snapshotter {
    Snapshotter::open(&dir.join("root"), Mode::Overlay).unwrap()
}

/// Mounts `mounts` (one mount, as the snapshotter returns) on a new dir and returns it; the
/// guard unmounts.
pub struct Mounted(pub PathBuf);

impl Mounted {
    pub fn new(mounts: &[Mount], at: PathBuf) -> Mounted {
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        std::fs::create_dir_all(&at).unwrap();
        mounts[0]
            .mount(&at)
            .unwrap_or_else(|e| panic!("mount {:?}: {e}", mounts[0]));
        Mounted(at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        strata_overlay::mount::unmount(&self.0, true).unwrap();
    }
}

/// Waits (deletions run in the background, up to 5 s) until the numbered directories under
/// `snapshots` are exactly the `records`' ids plus at most `ready` ready dirs (each as a server
/// leaves it), and panics with what is there otherwise.
pub fn assert_dirs_are_records(
    snapshots: &Path,
    records: &std::collections::BTreeSet<i64>,
    ready: usize,
) {
    let mut dirs = Vec::new();
    for _ in 0..250 {
        dirs = std::fs::read_dir(snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let numbered: std::collections::BTreeSet<i64> =
            dirs.iter().filter_map(|d| d.parse().ok()).collect();
        let extra: Vec<i64> = numbered.difference(records).copied().collect();
        if records.is_subset(&numbered)
            && extra.len() <= ready
            && extra
                .iter()
                .all(|&id| strata_snapshotter::store::is_ready_dir(&snapshots.join(id.to_string())))
            && dirs.iter().all(|d| d.parse::<i64>().is_ok())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("records {records:?} but directories {dirs:?}");
}
