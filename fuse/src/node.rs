//! The inode table: one node per path of the merged view, numbered on first lookup and kept
//! for the mount's lifetime, so inode numbers are stable while mounted (as kernel overlay's are
//! for a mount without `xino` games). Nodes are looked up by number on every request and by
//! path on every lookup; both maps sit behind one `RwLock`, taken for writing only when a path
//! is seen for the first time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The root's node number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

#[derive(Default)]
struct Table {
    paths: Vec<PathBuf>,
    by_path: HashMap<PathBuf, u64>,
}

/// Node numbers <-> relative paths in the merged view.
pub struct Nodes {
    table: RwLock<Table>,
}

impl Default for Nodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Nodes {
    /// A table holding only the root (number 1, the empty path).
    pub fn new() -> Nodes {
        let mut t = Table::default();
        // Index 0 is unused so that node numbers are indexes.
        t.paths.push(PathBuf::new());
        t.paths.push(PathBuf::new());
        t.by_path.insert(PathBuf::new(), ROOT);
        Nodes {
            table: RwLock::new(t),
        }
    }

    /// The path of node `ino`, if it exists.
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        (ino >= ROOT)
            .then(|| t.paths.get(ino as usize).cloned())
            .flatten()
    }

    /// The number of `path`, given one on first sight.
    pub fn number(&self, path: &Path) -> u64 {
        if let Some(&n) = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_path
            .get(path)
        {
            return n;
        }
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&n) = t.by_path.get(path) {
            return n;
        }
        let n = t.paths.len() as u64;
        t.paths.push(path.to_path_buf());
        t.by_path.insert(path.to_path_buf(), n);
        n
    }

    /// Forgets the number of `path` (it was deleted): a new entry there gets a new number, so an
    /// open file of the old one is not mistaken for it.
    pub fn forget_path(&self, path: &Path) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<PathBuf> = t
            .by_path
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in gone {
            t.by_path.remove(&p);
        }
    }

    /// Moves `from` (and everything below it) to `to`, keeping the numbers: the kernel goes on
    /// naming the moved inodes by them.
    pub fn rename(&self, from: &Path, to: &Path) {
        self.forget_path(to);
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let moved: Vec<(PathBuf, u64)> = t
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        for (p, n) in moved {
            let rest = p.strip_prefix(from).expect("filtered by prefix");
            // `join("")` would add a trailing slash, which no longer names a file.
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            t.by_path.remove(&p);
            t.by_path.insert(new.clone(), n);
            t.paths[n as usize] = new;
        }
    }

    /// How many nodes exist (the root included).
    pub fn len(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .paths
            .len()
            - 1
    }

    /// True when only the root exists.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_unique() {
        let n = Nodes::new();
        assert_eq!(n.number(Path::new("")), ROOT);
        let a = n.number(Path::new("a"));
        let b = n.number(Path::new("a/b"));
        assert_ne!(a, b);
        assert_eq!(n.number(Path::new("a")), a);
        assert_eq!(n.path(b).unwrap(), Path::new("a/b"));
        assert!(n.path(0).is_none() && n.path(99).is_none());
        assert_eq!(n.len(), 3);
        n.rename(Path::new("a"), Path::new("x/y"));
        assert_eq!(n.path(a).unwrap(), Path::new("x/y"));
        assert_eq!(n.path(b).unwrap(), Path::new("x/y/b"));
        assert_eq!(n.number(Path::new("x/y")), a);
        n.forget_path(Path::new("x"));
        assert_ne!(
            n.number(Path::new("x/y")),
            a,
            "a deleted path's number is not reused"
        );
    }
}
