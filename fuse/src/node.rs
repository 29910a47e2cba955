//! The inode table: one node per path of the merged view, numbered on first lookup and kept
//! for the mount's lifetime, so inode numbers are stable while mounted (as kernel overlay's are
//! for a mount without `xino` games). Nodes are looked up by number on every request and by
//! path on every lookup; both maps sit behind one `RwLock`, taken for writing only when a path
//! is seen for the first time.
//!
//! Hard links: a non-directory with several links is one node whatever name it is reached by.
//! Its first name is the node's path; further names are aliases, found by the file's
//! `(st_dev, st_ino)` when first looked up, and one of them takes over when the path is
//! unlinked. After a copy-up moves a linked file to the upper, [`Nodes::same_file`] ties the
//! upper inode to the node, so names looked up later still find it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::pathmap::PathMap;

/// The root's node number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

#[derive(Default)]
struct Table {
    paths: Vec<PathBuf>,
    /// Ordered so that a path's subtree is one range.
    by_path: PathMap<u64>,
    /// Linked files' `(st_dev, st_ino)` -> node.
    by_file: HashMap<(u64, u64), u64>,
    /// Node -> the `by_file` keys pointing at it.
    files: HashMap<u64, Vec<(u64, u64)>>,
    /// Node -> its names besides `paths[n]`.
    aliases: HashMap<u64, Vec<PathBuf>>,
}

impl Table {
    /// `p`, a name of node `n`, is gone: another name takes over, or the node is nameless (its
    /// file identities are dropped, so a reused inode number cannot find it).
    fn unname(&mut self, p: &Path, n: u64) {
        let aliases = self.aliases.entry(n).or_default();
        aliases.retain(|a| a != p);
        if self.paths[n as usize] == p {
            match aliases.pop() {
                Some(next) => self.paths[n as usize] = next,
                None => {
                    self.aliases.remove(&n);
                    for k in self.files.remove(&n).unwrap_or_default() {
                        self.by_file.remove(&k);
                    }
                }
            }
        }
    }
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
        t.by_path.insert(Path::new(""), ROOT);
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
        self.number_of(path, None)
    }

    /// The number of `path` whose entry is the file `(st_dev, st_ino)` when it is a
    /// non-directory with more than one link: another name of the same file has its number.
    pub fn number_of(&self, path: &Path, linked: Option<(u64, u64)>) -> u64 {
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
        if let Some(&n) = linked.and_then(|k| t.by_file.get(&k)) {
            t.by_path.insert(path, n);
            t.aliases.entry(n).or_default().push(path.to_path_buf());
            return n;
        }
        let n = t.paths.len() as u64;
        t.paths.push(path.to_path_buf());
        t.by_path.insert(path, n);
        if let Some(k) = linked {
            t.by_file.insert(k, n);
            t.files.entry(n).or_default().push(k);
        }
        n
    }

    /// `path` is a new name of node `n` (a hard link made through the mount).
    pub fn add_name(&self, path: &Path, n: u64) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = t.by_path.insert(path, n) {
            if old != n {
                t.unname(path, old);
            }
        }
        t.aliases.entry(n).or_default().push(path.to_path_buf());
    }

    /// The file `(st_dev, st_ino)` is node `n` too (its copy in the upper, after a copy-up).
    pub fn same_file(&self, key: (u64, u64), n: u64) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        t.by_file.insert(key, n);
        t.files.entry(n).or_default().push(key);
    }

    /// Forgets the number of `path` (it was deleted): a new entry there gets a new number, so an
    /// open file of the old one is not mistaken for it.
    pub fn forget_path(&self, path: &Path) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        for (p, _) in t.by_path.subtree(path) {
            if let Some(n) = t.by_path.remove(&p) {
                t.unname(&p, n);
            }
        }
    }

    /// Moves `from` (and everything below it) to `to`, keeping the numbers: the kernel goes on
    /// naming the moved inodes by them.
    pub fn rename(&self, from: &Path, to: &Path) {
        self.forget_path(to);
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        for (p, n) in t.by_path.subtree(from) {
            let rest = p.strip_prefix(from).expect("filtered by prefix");
            // `join("")` would add a trailing slash, which no longer names a file.
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            t.by_path.remove(&p);
            t.by_path.insert(&new, n);
            if t.paths[n as usize] == p {
                t.paths[n as usize] = new;
            } else if let Some(a) = t
                .aliases
                .get_mut(&n)
                .and_then(|v| v.iter_mut().find(|a| **a == p))
            {
                *a = new;
            }
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

    #[test]
    fn renames_and_forgets_take_exactly_the_subtree() {
        let n = Nodes::new();
        let names = ["a", "a/b", "a/b/c", "a-b", "a.b", "ab", "a/z", "a0", "b"];
        let nums: Vec<u64> = names.iter().map(|p| n.number(Path::new(p))).collect();
        n.rename(Path::new("a"), Path::new("m"));
        for (p, want) in [("m", nums[0]), ("m/b/c", nums[2]), ("m/z", nums[6])] {
            assert_eq!(n.number(Path::new(p)), want, "{p} moved with its parent");
        }
        for i in [3, 4, 5, 7, 8] {
            let p = names[i];
            assert_eq!(n.path(nums[i]).unwrap(), Path::new(p), "{p} is not below a");
        }
        n.forget_path(Path::new("m"));
        assert!(
            n.path(nums[1]).unwrap() == Path::new("m/b"),
            "a forgotten node keeps its last name"
        );
        assert_ne!(n.number(Path::new("m/b")), nums[1]);
        assert_eq!(n.number(Path::new("a-b")), nums[3]);
        assert_eq!(n.number(Path::new("ab")), nums[5]);
    }

    #[test]
    fn hard_links_share_a_node_that_outlives_its_first_name() {
        let n = Nodes::new();
        let f = Some((7, 42));
        let a = n.number_of(Path::new("d/a"), f);
        let b = n.number_of(Path::new("b"), f);
        assert_eq!(a, b, "two names of one file are one node");
        assert_ne!(n.number_of(Path::new("c"), Some((7, 43))), a);
        n.forget_path(Path::new("d"));
        assert_eq!(
            n.path(a).unwrap(),
            Path::new("b"),
            "the other name takes over"
        );
        n.rename(Path::new("b"), Path::new("e"));
        assert_eq!(n.path(a).unwrap(), Path::new("e"));
        n.same_file((8, 1), a);
        assert_eq!(n.number_of(Path::new("up"), Some((8, 1))), a);
        n.forget_path(Path::new("e"));
        assert_eq!(n.path(a).unwrap(), Path::new("up"));
        n.forget_path(Path::new("up"));
        assert_ne!(
            n.number_of(Path::new("new"), Some((8, 1))),
            a,
            "a nameless node's inode identity is dropped"
        );
        n.add_name(Path::new("x"), b);
        assert_eq!(n.number(Path::new("x")), b);
    }
}
