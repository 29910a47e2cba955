//! A map keyed by relative paths of the merged view, ordered by the paths' bytes: lookups
//! compare bytes (not `Path` components), and the paths below `p` are one range, `p/` up to
//! `p0` (`'0'` follows `'/'`), so dropping or moving a subtree touches only its entries.
//! Paths here are relative, without `.`, `..`, doubled or trailing slashes.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn key(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Relative path -> `V`, with subtree ranges.
pub(crate) struct PathMap<V>(BTreeMap<Vec<u8>, V>);

impl<V> Default for PathMap<V> {
    fn default() -> Self {
        PathMap(BTreeMap::new())
    }
}

impl<V: Clone> PathMap<V> {
    pub(crate) fn get(&self, p: &Path) -> Option<&V> {
        self.0.get(key(p))
    }

    pub(crate) fn insert(&mut self, p: &Path, v: V) -> Option<V> {
        self.0.insert(key(p).to_vec(), v)
    }

    pub(crate) fn remove(&mut self, p: &Path) -> Option<V> {
        self.0.remove(key(p))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear()
    }

    /// The entries at or below `p` (all of them for the root, the empty path).
    fn at_or_below<'a>(&'a self, p: &Path) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a V)> + 'a> {
        let p = key(p);
        if p.is_empty() {
            return Box::new(self.0.iter());
        }
        let (mut lo, mut hi) = (p.to_vec(), p.to_vec());
        lo.push(b'/');
        hi.push(b'/' + 1);
        let below = self
            .0
            .range::<Vec<u8>, _>((Bound::Included(lo), Bound::Excluded(hi)));
        Box::new(self.0.get_key_value(p).into_iter().chain(below))
    }

    /// Every entry at or below `p`, with its path.
    pub(crate) fn subtree(&self, p: &Path) -> Vec<(PathBuf, V)> {
        self.at_or_below(p)
            .map(|(k, v)| (PathBuf::from(OsStr::from_bytes(k)), v.clone()))
            .collect()
    }

    /// Removes every entry at or below `p`.
    pub(crate) fn remove_subtree(&mut self, p: &Path) {
        let gone: Vec<Vec<u8>> = self.at_or_below(p).map(|(k, _)| k.clone()).collect();
        for k in gone {
            self.0.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subtree_is_exactly_the_paths_below() {
        let mut m = PathMap::default();
        for (i, p) in [
            "", "a", "a/b", "a/b/c", "a-b", "a.b", "ab", "a/z", "a0", "b",
        ]
        .iter()
        .enumerate()
        {
            m.insert(Path::new(p), i);
        }
        fn names(m: &PathMap<usize>, p: &str) -> Vec<String> {
            let mut v: Vec<String> = m
                .subtree(Path::new(p))
                .into_iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            v.sort();
            v
        }
        assert_eq!(names(&m, "a"), ["a", "a/b", "a/b/c", "a/z"]);
        assert_eq!(names(&m, "a/b"), ["a/b", "a/b/c"]);
        assert_eq!(names(&m, "ab"), ["ab"]);
        assert_eq!(names(&m, "").len(), 10);
        assert!(names(&m, "x").is_empty());
        m.remove_subtree(Path::new("a"));
        assert_eq!(names(&m, "").len(), 6);
        assert_eq!(m.get(Path::new("a-b")), Some(&4));
    }
}
