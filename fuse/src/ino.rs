//! The inode numbers the union shows, which are also its FUSE node ids (fuser answers an entry
//! with one number for both).
//!
//! A merged entry is numbered after the file that backs it, as kernel overlay numbers it with
//! `xino`: the backing file's `st_ino` when every layer is on one filesystem, and otherwise
//! that number with the filesystem's index in its top 8 bits. A number is thus the same
//! whenever a name is looked up again, including after the kernel has forgotten its node, and
//! hard links share theirs. A copy-up gives an entry a new backing file, so the union notes the
//! copy's origin and goes on showing the origin's number for the rest of the mount (kernel
//! overlay keeps it in an `overlay.origin` xattr; the upper here carries no overlay xattrs, so
//! after a remount a copied-up entry shows its upper file's number). One exception: a file
//! copied up while its lower file is open through a passed-through inode is renumbered
//! ([`Inos::renumber`]), since the kernel cannot give that inode a second backing file.
//!
//! Two numbers are reserved: 0 (none) and 1 (FUSE's root node). A backing file numbered 0 or 1
//! (tmpfs numbers its root 1; a lower root is never an entry) is shown under [`SPARE`].

use std::collections::HashMap;
use std::sync::RwLock;

use nix::sys::stat::FileStat;

use crate::layer::Stack;

/// The root's node id (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

/// Where a backing file numbered 0 or 1 is shown (an entry, not the union's root).
pub const SPARE: u64 = u64::MAX >> 8;

/// Bits of a backing `st_ino` kept when the layers span several filesystems.
const INO_BITS: u32 = 56;

/// The union's inode numbering (see the module doc).
pub struct Inos {
    /// The layers' filesystems (`st_dev`), in the order first met top down.
    devs: Vec<u64>,
    /// Upper files and dirs made by a copy-up, by `(st_dev, st_ino)` -> the number shown.
    origins: RwLock<HashMap<(u64, u64), u64>>,
}

impl Inos {
    /// The numbering of a union over `stack`.
    pub fn new(stack: &Stack) -> Inos {
        let mut devs = Vec::new();
        for l in stack.layers() {
            if let Ok(st) = nix::sys::stat::lstat(&l.root) {
                if !devs.contains(&st.st_dev) {
                    devs.push(st.st_dev);
                }
            }
        }
        Inos {
            devs,
            origins: RwLock::new(HashMap::new()),
        }
    }

    /// The number shown for the entry `st` describes.
    pub fn of(&self, st: &FileStat) -> u64 {
        self.of_file(st.st_dev, st.st_ino)
    }

    /// The number shown for the backing file `(dev, ino)`.
    pub fn of_file(&self, dev: u64, ino: u64) -> u64 {
        if let Some(&n) = self
            .origins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(dev, ino))
        {
            return n;
        }
        let n = match self.devs.iter().position(|&d| d == dev) {
            Some(0) | None if self.devs.len() <= 1 => ino,
            Some(i) => ((i as u64) << INO_BITS) | (ino & ((1 << INO_BITS) - 1)),
            // A filesystem no layer root is on (a mount inside a layer): after the known ones.
            None => ((self.devs.len() as u64) << INO_BITS) | (ino & ((1 << INO_BITS) - 1)),
        };
        if n <= ROOT { SPARE } else { n }
    }

    /// The upper file `copy` was just copied up from `source` (both `(st_dev, st_ino)`): it
    /// goes on showing `source`'s number.
    pub fn copied(&self, source: (u64, u64), copy: (u64, u64)) {
        let n = self.of_file(source.0, source.1);
        self.origins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(copy, n);
    }

    /// The upper file `(dev, ino)` was deleted (its last link): its inode number may be given
    /// to a new file, which must not show the old origin's number.
    pub fn gone(&self, dev: u64, ino: u64) {
        self.origins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(dev, ino));
    }

    /// The copy `(dev, ino)` is shown under a number of its own from now on, no longer its
    /// origin's (the kernel still holds the origin's inode for the lower file, see
    /// `Union::io_mode`).
    pub fn renumber(&self, dev: u64, ino: u64) {
        self.gone(dev, ino);
    }

    /// How many copied-up files keep an origin's number (for tests and statistics).
    pub fn origins(&self) -> usize {
        self.origins.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Layer, LayerKind};

    #[test]
    fn one_filesystem_shows_backing_numbers_and_copies_keep_their_origin() {
        let t = tempfile::tempdir().unwrap();
        let (u, l) = (t.path().join("u"), t.path().join("l"));
        std::fs::create_dir(&u).unwrap();
        std::fs::create_dir(&l).unwrap();
        let stack = Stack::new(vec![
            Layer {
                root: u.clone(),
                kind: LayerKind::Upper,
            },
            Layer {
                root: l.clone(),
                kind: LayerKind::Lower,
            },
        ]);
        let inos = Inos::new(&stack);
        std::fs::write(l.join("f"), b"x").unwrap();
        std::fs::write(u.join("f"), b"x").unwrap();
        let (lf, uf) = (
            nix::sys::stat::lstat(&l.join("f")).unwrap(),
            nix::sys::stat::lstat(&u.join("f")).unwrap(),
        );
        assert_eq!(inos.of(&lf), lf.st_ino);
        assert_eq!(inos.of(&uf), uf.st_ino);
        inos.copied((lf.st_dev, lf.st_ino), (uf.st_dev, uf.st_ino));
        assert_eq!(inos.of(&uf), lf.st_ino, "a copy shows its origin's number");
        inos.gone(uf.st_dev, uf.st_ino);
        assert_eq!(
            inos.of(&uf),
            uf.st_ino,
            "a deleted copy's number is free again"
        );
        assert_eq!(inos.of_file(lf.st_dev, 1), SPARE, "1 is the root's");
    }

    #[test]
    fn several_filesystems_are_told_apart_in_the_top_bits() {
        let t = tempfile::tempdir().unwrap();
        let stack = Stack::new(vec![
            Layer {
                root: t.path().to_path_buf(),
                kind: LayerKind::Upper,
            },
            Layer {
                root: "/proc".into(),
                kind: LayerKind::Lower,
            },
        ]);
        let inos = Inos::new(&stack);
        let (a, b) = (
            nix::sys::stat::lstat(t.path()).unwrap(),
            nix::sys::stat::lstat("/proc").unwrap(),
        );
        assert_ne!(a.st_dev, b.st_dev);
        assert_eq!(inos.of_file(a.st_dev, 77), 77);
        assert_eq!(inos.of_file(b.st_dev, 77), (1 << INO_BITS) | 77);
    }
}
