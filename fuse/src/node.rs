//! The node table: the merged-view entries the kernel holds, by node id (the inode number the
//! union shows, see [`crate::ino`]), each with the names it is reached by and how many times
//! the kernel has looked it up. A node goes when the kernel forgets it (FORGET), so the table
//! holds what the kernel's caches hold and no more; [`Nodes::coldest`] names the least recently
//! used ones, which the union asks the kernel to drop when the table grows past its cap.
//!
//! Nodes are found by id on every request and by path when a path is renamed or deleted; both
//! maps sit behind one `RwLock`, taken for writing only when a node or a name is new or goes.
//! Lookup counts and use stamps are atomics, so a lookup of a known name takes the read lock.
//!
//! A node of a file in a read-only layer remembers that file's attributes (such a file does not
//! change while mounted, as kernel overlay also requires of its lowers), so a listing with
//! attributes answers for the files the kernel already holds without an `lstat` each.
//!
//! Hard links: every name of a file has the file's number, so the names are one node. Its
//! first name is the node's path; further names are aliases, and one of them takes over when
//! the path is unlinked.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use nix::sys::stat::FileStat;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use crate::ino::ROOT;
use crate::pathmap::PathMap;

struct Node {
    /// The name requests on the node go through.
    path: PathBuf,
    /// Its other names (hard links).
    aliases: Vec<PathBuf>,
    /// False once every name is gone (deleted, still open): `path` is its last name.
    named: bool,
    /// The kernel's references (lookups not yet forgotten).
    lookups: AtomicU64,
    /// When it was last looked up, on the table's clock.
    used: AtomicU64,
    /// The attributes of its file in a read-only layer, once read: such a file never
    /// changes while mounted, so a listing with attributes need not stat it again.
    lower: OnceLock<FileStat>,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    /// Every name -> node, ordered so that a path's subtree is one range.
    by_path: PathMap<u64>,
}

impl Table {
    /// `p`, a name of node `n`, is gone: another name takes over, or the node is nameless.
    fn unname(&mut self, p: &Path, n: u64) {
        let Some(node) = self.nodes.get_mut(&n) else {
            return;
        };
        node.aliases.retain(|a| a != p);
        if node.path == p {
            match node.aliases.pop() {
                Some(next) => node.path = next,
                None => node.named = false,
            }
        }
    }

    /// `p` names node `n` now (a name it had elsewhere is dropped first by the caller).
    fn name(&mut self, p: &Path, n: u64) {
        if let Some(old) = self.by_path.insert(p, n) {
            if old != n {
                self.unname(p, old);
            }
        }
        let node = self.nodes.get_mut(&n).expect("named nodes exist");
        if !node.named {
            node.path = p.to_path_buf();
            node.named = true;
        } else if node.path != p && !node.aliases.iter().any(|a| a == p) {
            node.aliases.push(p.to_path_buf());
        }
    }
}

/// Node ids <-> relative paths in the merged view.
pub struct Nodes {
    table: RwLock<Table>,
    clock: AtomicU64,
    /// `table.nodes.len()`, readable without the lock.
    count: AtomicUsize,
    /// Nodes removed so far (forgotten by the kernel), ever growing.
    gone: AtomicU64,
}

impl Default for Nodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Nodes {
    /// A table holding only the root (node [`ROOT`], the empty path), never forgotten.
    pub fn new() -> Nodes {
        let mut t = Table::default();
        t.nodes.insert(
            ROOT,
            Node {
                path: PathBuf::new(),
                aliases: Vec::new(),
                named: true,
                lookups: AtomicU64::new(1),
                used: AtomicU64::new(0),
                lower: OnceLock::new(),
            },
        );
        t.by_path.insert(Path::new(""), ROOT);
        Nodes {
            table: RwLock::new(t),
            clock: AtomicU64::new(1),
            count: AtomicUsize::new(1),
            gone: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The path of node `id`, if the kernel still holds it.
    pub fn path(&self, id: u64) -> Option<PathBuf> {
        self.read().nodes.get(&id).map(|n| n.path.clone())
    }

    /// The node `path` names, if the kernel holds one for it.
    pub fn id(&self, path: &Path) -> Option<u64> {
        self.read().by_path.get(path).copied()
    }

    /// The kernel has looked `path` up and been answered with node `id` (a lookup, or an
    /// entry made or listed with its attributes): one more reference.
    pub fn looked_up(&self, path: &Path, id: u64) {
        let path_is = |p: &Path| p.as_os_str().as_bytes() == path.as_os_str().as_bytes();
        if self.known(id, |n| {
            path_is(&n.path) || n.aliases.iter().any(|a| path_is(a))
        }) {
            return;
        }
        self.add(path, id);
    }

    /// [`Nodes::looked_up`] for `name` in directory `dir`: the path is only made when the
    /// node or the name is new (a listing's entries are mostly known).
    pub fn looked_up_in(&self, dir: &Path, name: &OsStr, id: u64) {
        if self.known(id, |n| Self::names(n, dir, name)) {
            return;
        }
        self.add(&dir.join(name), id);
    }

    /// [`Nodes::looked_up_in`] answered from memory: if node `id` is known by `name` in `dir`
    /// and remembers the attributes of backing file `file` (see [`Nodes::remember_lower`]),
    /// one more reference and those attributes; otherwise None, and nothing counted.
    pub fn lower_attrs_in(
        &self,
        dir: &Path,
        name: &OsStr,
        id: u64,
        file: (u64, u64),
    ) -> Option<FileStat> {
        let mut out = None;
        self.known(id, |n| match n.lower.get() {
            Some(st) if (st.st_dev, st.st_ino) == file && Self::names(n, dir, name) => {
                out = Some(*st);
                true
            }
            _ => false,
        });
        out
    }

    /// Node `id`, if the kernel holds it, remembers `st`: the attributes of its file in a
    /// read-only layer.
    pub fn remember_lower(&self, id: u64, st: &FileStat) {
        if let Some(n) = self.read().nodes.get(&id) {
            let _ = n.lower.set(*st);
        }
    }

    /// True when `name` in `dir` is a name of node `n`.
    fn names(n: &Node, dir: &Path, name: &OsStr) -> bool {
        let (d, m) = (dir.as_os_str().as_bytes(), name.as_bytes());
        let is = |p: &[u8]| {
            if d.is_empty() {
                return p == m;
            }
            p.len() == d.len() + 1 + m.len()
                && p.starts_with(d)
                && p[d.len()] == b'/'
                && p.ends_with(m)
        };
        is(n.path.as_os_str().as_bytes()) || n.aliases.iter().any(|a| is(a.as_os_str().as_bytes()))
    }

    /// One more reference to node `id` if it is named and `is` accepts it (knows it by the
    /// name at hand); false otherwise.
    fn known(&self, id: u64, is: impl FnOnce(&Node) -> bool) -> bool {
        let t = self.read();
        let Some(n) = t.nodes.get(&id) else {
            return false;
        };
        let named = n.named && is(n);
        if named {
            n.lookups.fetch_add(1, Ordering::Relaxed);
            n.used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        named
    }

    fn add(&self, path: &Path, id: u64) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut t = self.write();
        match t.nodes.get(&id) {
            Some(n) => {
                n.lookups.fetch_add(1, Ordering::Relaxed);
                n.used.store(now, Ordering::Relaxed);
            }
            None => {
                t.nodes.insert(
                    id,
                    Node {
                        path: path.to_path_buf(),
                        aliases: Vec::new(),
                        named: false,
                        lookups: AtomicU64::new(1),
                        used: AtomicU64::new(now),
                        lower: OnceLock::new(),
                    },
                );
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        t.name(path, id);
    }

    /// The kernel dropped `n` references to node `id` (FORGET); with the last one the node
    /// goes, and its names with it. The root stays.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        {
            let t = self.read();
            let Some(node) = t.nodes.get(&id) else {
                return;
            };
            // The kernel never forgets more than it was given; a saturated count still goes.
            let before = node
                .lookups
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    Some(l.saturating_sub(n))
                })
                .expect("the closure always returns Some");
            if before > n {
                return;
            }
        }
        let mut t = self.write();
        // Looked up again meanwhile: it stays.
        if t.nodes
            .get(&id)
            .is_none_or(|n| n.lookups.load(Ordering::Relaxed) > 0)
        {
            return;
        }
        let node = t.nodes.remove(&id).expect("checked above");
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gone.fetch_add(1, Ordering::Relaxed);
        for p in std::iter::once(&node.path).chain(node.aliases.iter()) {
            if t.by_path.get(p) == Some(&id) {
                t.by_path.remove(p);
            }
        }
    }

    /// `path` is a new name of node `id` (a hard link made through the mount).
    pub fn add_name(&self, path: &Path, id: u64) {
        let mut t = self.write();
        if t.nodes.contains_key(&id) {
            t.name(path, id);
        }
    }

    /// `path` and everything below it were deleted: their names go (nodes still open keep
    /// their last name, for requests through their open files).
    pub fn forget_path(&self, path: &Path) {
        let mut t = self.write();
        for (p, n) in t.by_path.subtree(path) {
            t.by_path.remove(&p);
            t.unname(&p, n);
        }
    }

    /// Moves `from` (and everything below it) to `to`, keeping the ids: the kernel goes on
    /// naming the moved inodes by them.
    pub fn rename(&self, from: &Path, to: &Path) {
        self.forget_path(to);
        let mut t = self.write();
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
            if let Some(node) = t.nodes.get_mut(&n) {
                if node.path == p {
                    node.path = new;
                } else if let Some(a) = node.aliases.iter_mut().find(|a| **a == p) {
                    *a = new;
                }
            }
        }
    }

    /// The paths of the `k` least recently looked-up nodes (never the root): what to ask the
    /// kernel to drop when the table is over its cap.
    pub fn coldest(&self, k: usize) -> Vec<PathBuf> {
        let t = self.read();
        let mut all: Vec<(u64, &Node)> = t
            .nodes
            .iter()
            .filter(|(id, n)| **id != ROOT && n.named)
            .map(|(_, n)| (n.used.load(Ordering::Relaxed), n))
            .collect();
        let k = k.min(all.len());
        if k == 0 {
            return Vec::new();
        }
        all.select_nth_unstable_by_key(k - 1, |(used, _)| *used);
        all[..k].iter().map(|(_, n)| n.path.clone()).collect()
    }

    /// How many nodes the kernel holds (the root included).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// How many nodes have been forgotten since the table was made: what an eviction round
    /// counts, since the table's size moves with lookups too.
    pub fn forgotten(&self) -> u64 {
        self.gone.load(Ordering::Relaxed)
    }

    /// True when only the root is held.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn nodes_live_as_long_as_the_kernel_holds_them() {
        let n = Nodes::new();
        n.looked_up(p("a"), 10);
        n.looked_up(p("a"), 10);
        n.looked_up(p("a/b"), 11);
        assert_eq!(n.len(), 3);
        assert_eq!(n.path(11).unwrap(), p("a/b"));
        assert_eq!(n.id(p("a")), Some(10));
        n.forget(10, 1);
        assert_eq!(n.path(10).unwrap(), p("a"), "one reference is left");
        n.forget(10, 1);
        assert!(
            n.path(10).is_none() && n.id(p("a")).is_none(),
            "the last one is gone"
        );
        n.looked_up(p("a"), 10);
        assert_eq!(n.path(10).unwrap(), p("a"), "a later lookup makes it again");
        n.forget(ROOT, 5);
        assert_eq!(n.path(ROOT).unwrap(), p(""), "the root stays");
        n.forget(99, 1);
    }

    #[test]
    fn renames_and_deletions_take_exactly_the_subtree() {
        let n = Nodes::new();
        let names = ["a", "a/b", "a/b/c", "a-b", "a.b", "ab", "a/z", "a0", "b"];
        for (i, name) in names.iter().enumerate() {
            n.looked_up(p(name), 100 + i as u64);
        }
        n.rename(p("a"), p("m"));
        for (path, want) in [("m", 100), ("m/b/c", 102), ("m/z", 106)] {
            assert_eq!(n.id(p(path)), Some(want), "{path} moved with its parent");
        }
        for i in [3, 4, 5, 7, 8] {
            assert_eq!(n.path(100 + i as u64).unwrap(), p(names[i]), "not below a");
        }
        n.forget_path(p("m"));
        assert_eq!(
            n.path(101).unwrap(),
            p("m/b"),
            "a deleted node keeps its last name"
        );
        assert_eq!(n.id(p("m/b")), None);
        assert_eq!(n.id(p("a-b")), Some(103));
    }

    #[test]
    fn a_listing_counts_known_names_and_names_new_ones() {
        let n = Nodes::new();
        let (d, name) = (p("d/e"), OsStr::new("f"));
        n.looked_up_in(p(""), OsStr::new("top"), 7);
        assert_eq!(n.id(p("top")), Some(7));
        n.looked_up_in(d, name, 8);
        n.looked_up_in(d, name, 8);
        assert_eq!(n.id(p("d/e/f")), Some(8));
        // A name that merely ends like a known one is another name.
        n.looked_up_in(p("d"), OsStr::new("e/f"), 8);
        n.looked_up_in(p("x/d/e"), name, 8);
        assert_eq!(n.id(p("x/d/e/f")), Some(8), "a second name of the node");
        n.forget_path(p("d"));
        assert_eq!(n.id(p("d/e/f")), None);
        n.looked_up_in(d, name, 8);
        assert_eq!(
            n.id(p("d/e/f")),
            Some(8),
            "a deleted name listed again is named again"
        );
        n.forget(8, 5);
        assert!(n.path(8).is_none(), "five references in all");
    }

    #[test]
    fn hard_links_are_one_node_that_outlives_its_first_name() {
        let n = Nodes::new();
        n.looked_up(p("d/a"), 42);
        n.looked_up(p("b"), 42);
        assert_eq!(n.len(), 2, "two names of one file are one node");
        n.forget_path(p("d"));
        assert_eq!(n.path(42).unwrap(), p("b"), "the other name takes over");
        n.rename(p("b"), p("e"));
        assert_eq!(n.path(42).unwrap(), p("e"));
        n.add_name(p("x"), 42);
        assert_eq!(n.id(p("x")), Some(42));
        n.forget(42, 2);
        assert_eq!(n.id(p("x")), None, "all its names go with it");
        assert_eq!(n.id(p("e")), None);
    }

    #[test]
    fn the_coldest_are_the_least_recently_looked_up() {
        let n = Nodes::new();
        for i in 0..10u64 {
            n.looked_up(Path::new(&format!("f{i}")), 100 + i);
        }
        n.looked_up(p("f0"), 100);
        let mut cold = n.coldest(3);
        cold.sort();
        assert_eq!(cold, [p("f1"), p("f2"), p("f3")]);
        assert_eq!(n.coldest(100).len(), 10, "never the root");
    }
}
