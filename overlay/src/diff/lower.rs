//! A read-only merged view of a stack of lower layer directories.
//!
//! Lookups go top-down and honour each layer's whiteouts and opaque directories, as the kernel
//! does for lowers, in both forms a layer may keep them in: char 0:0 devices and the opaque
//! xattr, or the OCI form (`.wh.NAME` files, a `.wh..wh..opq` file; a layer's own NAME stays
//! beside its `.wh.NAME`, which hides only the layers below). Lowers holding `redirect` or
//! `metacopy` xattrs are refused with [`Error::LowerOverlayXattr`] rather than read wrongly.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::entry;
use crate::whiteout::{self, XattrNs};
use crate::{Error, Result, sys};

/// Lower layers, top first.
#[derive(Debug, Clone, Default)]
pub struct LowerView {
    layers: Vec<PathBuf>,
}

/// Where a lower entry was found.
pub struct Found {
    /// Index of the layer holding it.
    pub layer: usize,
    /// The directory holding it, open.
    pub dir: OwnedFd,
    /// Its `lstat`.
    pub st: libc::stat,
}

enum Step {
    /// The path exists in this layer.
    Here(OwnedFd, libc::stat),
    /// Not in this layer; look further down.
    Below,
    /// Not in this layer, and lower layers are hidden (whiteout, opaque dir, or a non-directory
    /// over the path).
    Hidden,
}

impl LowerView {
    /// A view of `layers`, top first.
    pub fn new(layers: Vec<PathBuf>) -> Self {
        LowerView { layers }
    }

    /// True when there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer directories.
    pub fn layers(&self) -> &[PathBuf] {
        &self.layers
    }

    fn open_layer(&self, i: usize) -> Result<OwnedFd> {
        let p = &self.layers[i];
        let f = File::open(p).map_err(|e| Error::io("open lower", p, e))?;
        Ok(f.into())
    }

    /// Resolves `rel` in layer `i`, component by component, never following symlinks.
    fn step(&self, i: usize, rel: &[u8]) -> Result<Step> {
        let mut dir = self.open_layer(i)?;
        let comps: Vec<&[u8]> = rel
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let mut opaque_above = false;
        for (k, c) in comps.iter().enumerate() {
            if whiteout::classify(c) != whiteout::Marker::Plain {
                return Ok(Step::Hidden); // markers are never names of the merged view
            }
            let name = sys::cstr(c).map_err(|e| Error::io("lookup", self.path(i, rel), e))?;
            let st = match sys::lstatat(dir.as_fd(), &name) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let wh = sys::cstr(&whiteout::wh_name(c))
                        .map_err(|e| Error::io("lookup", self.path(i, rel), e))?;
                    let deleted = sys::lstatat(dir.as_fd(), &wh).is_ok();
                    return Ok(if opaque_above || deleted {
                        Step::Hidden
                    } else {
                        Step::Below
                    });
                }
                Err(e) => return Err(Error::io("lstat", self.path(i, rel), e)),
            };
            if whiteout::is_whiteout_stat(&st) {
                return Ok(Step::Hidden);
            }
            if k + 1 == comps.len() {
                return Ok(Step::Here(dir, st));
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Ok(Step::Hidden);
            }
            let sub = sys::openat(
                dir.as_fd(),
                &name,
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| Error::io("open", self.path(i, rel), e))?;
            self.refuse_overlay_meta(
                sub.as_fd(),
                c"",
                &self.path(i, &comps[..=k].join(&b'/')),
                true,
            )?;
            if is_opaque(sub.as_fd(), c"")? || has_opaque_marker(sub.as_fd()) {
                opaque_above = true;
            }
            dir = sub;
        }
        // The root of the layer.
        let st =
            sys::lstatat(dir.as_fd(), c"").map_err(|e| Error::io("lstat", &self.layers[i], e))?;
        let d = dir
            .try_clone()
            .map_err(|e| Error::io("dup", &self.layers[i], e))?;
        Ok(Step::Here(d, st))
    }

    fn path(&self, i: usize, rel: &[u8]) -> PathBuf {
        self.layers[i].join(std::ffi::OsStr::from_bytes(rel))
    }

    fn refuse_overlay_meta(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &CStr,
        path: &Path,
        is_dir: bool,
    ) -> Result<()> {
        let pick: fn(XattrNs) -> &'static CStr = if is_dir {
            XattrNs::redirect
        } else {
            XattrNs::metacopy
        };
        if entry::overlay_xattr(dir, name, pick)
            .map_err(|e| Error::io("getxattr", path, e))?
            .is_some()
        {
            let what = if is_dir {
                "overlay.redirect"
            } else {
                "overlay.metacopy"
            };
            return Err(Error::LowerOverlayXattr {
                path: path.into(),
                xattr: what.into(),
            });
        }
        Ok(())
    }

    /// Finds `rel` (a path relative to the layer roots; empty for the root) in the merged view.
    /// For the root, the directory in `Found` is the layer root itself.
    pub fn lookup(&self, rel: &[u8]) -> Result<Option<Found>> {
        for i in 0..self.layers.len() {
            match self.step(i, rel)? {
                Step::Here(dir, st) => {
                    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                        let base = rel.rsplit(|&b| b == b'/').next().unwrap_or(b"");
                        let name = sys::cstr(base)
                            .map_err(|e| Error::io("lookup", self.path(i, rel), e))?;
                        self.refuse_overlay_meta(dir.as_fd(), &name, &self.path(i, rel), false)?;
                    }
                    return Ok(Some(Found { layer: i, dir, st }));
                }
                Step::Below => {}
                Step::Hidden => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The merged listing of directory `rel`: name -> where it is. Whited-out names and names
    /// hidden by opaque directories are left out. Empty when `rel` is not a directory here.
    pub fn read_dir(&self, rel: &[u8]) -> Result<BTreeMap<Vec<u8>, Found>> {
        let mut out: BTreeMap<Vec<u8>, Found> = BTreeMap::new();
        let mut hidden: std::collections::HashSet<Vec<u8>> = Default::default();
        for i in 0..self.layers.len() {
            let dir = match self.step(i, rel)? {
                Step::Here(parent, st) => {
                    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        break;
                    }
                    if rel.is_empty() {
                        parent
                    } else {
                        let base = rel.rsplit(|&b| b == b'/').next().unwrap_or(b"");
                        let name = sys::cstr(base)
                            .map_err(|e| Error::io("lookup", self.path(i, rel), e))?;
                        sys::openat(
                            parent.as_fd(),
                            &name,
                            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
                            0,
                        )
                        .map_err(|e| Error::io("open", self.path(i, rel), e))?
                    }
                }
                Step::Below => continue,
                Step::Hidden => break,
            };
            let path = self.path(i, rel);
            // `.wh.NAME` hides NAME in the layers below this one.
            let mut deleted_below = Vec::new();
            for (name, _) in
                sys::read_dir(dir.as_fd()).map_err(|e| Error::io("read dir", &path, e))?
            {
                match whiteout::classify(&name) {
                    whiteout::Marker::Whiteout(n) => {
                        deleted_below.push(n.to_vec());
                        continue;
                    }
                    whiteout::Marker::Opaque => continue,
                    whiteout::Marker::Plain => {}
                }
                if out.contains_key(&name) || hidden.contains(&name) {
                    continue;
                }
                let cname = sys::cstr(&name).map_err(|e| Error::io("read dir", &path, e))?;
                let st =
                    sys::lstatat(dir.as_fd(), &cname).map_err(|e| Error::io("lstat", &path, e))?;
                if whiteout::is_whiteout_stat(&st) {
                    hidden.insert(name);
                    continue;
                }
                let d = dir.try_clone().map_err(|e| Error::io("dup", &path, e))?;
                out.insert(
                    name,
                    Found {
                        layer: i,
                        dir: d,
                        st,
                    },
                );
            }
            hidden.extend(deleted_below);
            if is_opaque(dir.as_fd(), c"")? || has_opaque_marker(dir.as_fd()) {
                break;
            }
        }
        Ok(out)
    }
}

/// True when the directory `dir` holds the OCI form's opaque marker (`.wh..wh..opq`).
pub(crate) fn has_opaque_marker(dir: std::os::fd::BorrowedFd<'_>) -> bool {
    // The marker name has no NUL: the conversion cannot fail.
    sys::cstr(whiteout::OPAQUE_MARKER).is_ok_and(|m| sys::lstatat(dir, &m).is_ok())
}

/// True when `name` in `dir` carries the opaque xattr in either namespace.
pub(crate) fn is_opaque(dir: std::os::fd::BorrowedFd<'_>, name: &CStr) -> Result<bool> {
    let v = entry::overlay_xattr(dir, name, XattrNs::opaque)
        .map_err(|e| Error::io("getxattr opaque", PathBuf::from("<dir>"), e))?;
    Ok(v.as_deref() == Some(whiteout::OPAQUE_VALUE))
}
