//! `docker diff`-style change lists: `A` added, `C` changed, `D` deleted, one path a line.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

pub use super::generic::ChangeKind;
use super::lower::{LowerView, has_opaque_marker, is_opaque};
use super::{entry, generic};
use crate::whiteout::{self, XattrNs};
use crate::{Error, Result, sys};

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    /// The path from the root, starting with `/`.
    pub path: String,
    /// What happened to it.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.kind {
            ChangeKind::Added => 'A',
            ChangeKind::Modified => 'C',
            ChangeKind::Deleted => 'D',
        };
        write!(f, "{c} {}", self.path)
    }
}

fn slash(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
}

/// The changes between two trees.
pub fn changes_generic(lower: &Path, upper: &Path) -> Result<Vec<Change>> {
    Ok(generic::compute(lower, upper)?
        .into_iter()
        .map(|(k, kind)| Change {
            path: slash(&k.join(&b'/')),
            kind,
        })
        .collect())
}

/// The changes an overlay upper directory makes over `lowers` (top first). An entry counts as
/// changed when the lowers have it, added otherwise; an empty `lowers` counts every entry added.
pub fn changes_native(upper: &Path, lowers: &LowerView) -> Result<Vec<Change>> {
    let root: OwnedFd = File::open(upper)
        .map_err(|e| Error::io("open upper", upper, e))?
        .into();
    let mut out = Vec::new();
    walk(root.as_fd(), b"", Some(Vec::new()), lowers, upper, &mut out)?;
    Ok(out)
}

fn walk(
    dir: BorrowedFd<'_>,
    rel: &[u8],
    lower: Option<Vec<u8>>,
    lowers: &LowerView,
    upper: &Path,
    out: &mut Vec<Change>,
) -> Result<()> {
    let err = |op, e| Error::io(op, upper.join(String::from_utf8_lossy(rel).as_ref()), e);
    let mut names = sys::read_dir(dir).map_err(|e| err("read dir", e))?;
    names.sort();
    let present: std::collections::HashSet<&[u8]> =
        names.iter().map(|(n, _)| n.as_slice()).collect();
    for (name, _) in &names {
        // The OCI form: `.wh.NAME` deletes NAME (unless this layer holds NAME too); the opaque
        // marker is read with its directory.
        match whiteout::classify(name) {
            whiteout::Marker::Whiteout(n) => {
                if !present.contains(n) {
                    out.push(Change {
                        path: slash(&entry::child(rel, n)),
                        kind: ChangeKind::Deleted,
                    });
                }
                continue;
            }
            whiteout::Marker::Opaque => continue,
            whiteout::Marker::Plain => {}
        }
        let path = entry::child(rel, name);
        let cname = sys::cstr(name).map_err(|e| err("name", e))?;
        let st = sys::lstatat(dir, &cname).map_err(|e| err("lstat", e))?;
        if whiteout::is_whiteout_stat(&st) {
            out.push(Change {
                path: slash(&path),
                kind: ChangeKind::Deleted,
            });
            continue;
        }
        let lower_path = lower.as_ref().map(|l| entry::child(l, name));
        let in_lower = match &lower_path {
            Some(lp) if !lowers.is_empty() => lowers.lookup(lp)?.is_some(),
            _ => false,
        };
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let redirected = is_dir
            && entry::overlay_xattr(dir, &cname, XattrNs::redirect)
                .map_err(|e| err("getxattr", e))?
                .is_some();
        let kind = if in_lower && !redirected {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        out.push(Change {
            path: slash(&path),
            kind,
        });
        if is_dir {
            let sub = sys::openat(
                dir,
                &cname,
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| err("open", e))?;
            let opaque = is_opaque(dir, &cname)? || has_opaque_marker(sub.as_fd());
            if opaque && in_lower {
                // Everything the lowers had below it is gone.
                let lp = lower_path.clone().unwrap_or_default();
                let upper_names: std::collections::HashSet<Vec<u8>> = sys::read_dir(sub.as_fd())
                    .map_err(|e| err("read dir", e))?
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| whiteout::classify(n) == whiteout::Marker::Plain)
                    .collect();
                for n in lowers.read_dir(&lp)?.into_keys() {
                    if !upper_names.contains(&n) {
                        out.push(Change {
                            path: slash(&entry::child(&path, &n)),
                            kind: ChangeKind::Deleted,
                        });
                    }
                }
            }
            let next = if opaque || redirected {
                None
            } else {
                lower_path
            };
            walk(sub.as_fd(), &path, next, lowers, upper, out)?;
        }
    }
    Ok(())
}
