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
