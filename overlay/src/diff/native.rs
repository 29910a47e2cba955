//! The native diff: an overlay upper directory straight to an OCI layer.
//!
//! Only the upper is walked, so the cost grows with the change, not with the image. Whiteout
//! devices become `.wh.` entries and opaque directories get a `.wh..wh..opq` marker (an upper
//! in the OCI form, `.wh.` files and markers, as a FUSE union on an overlayfs leaves it, is read
//! the same way). Uppers
//! written with `redirect_dir=on` or `metacopy=on`, which no peer's native diff can read, are
//! followed into the lowers:
//! - a directory with an `overlay.redirect` xattr is a renamed lower directory: it is written as
//!   an opaque directory holding the merged content of its origin (the kernel already left a
//!   whiteout at the old place), so the rename becomes delete + add;
//! - a file with an `overlay.metacopy` xattr has only its metadata in the upper: its data is
//!   read from the lower file it came from (its own absolute `redirect`, or the same path).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::lower::{Found, LowerView, has_opaque_marker};
use super::{DiffOptions, DiffReport, Sink, entry};
use crate::archive::{Entry, Kind};
use crate::whiteout::{self, XattrNs};
use crate::{Error, Result, sys};

/// Writes the native diff of overlay upper directory `upper` to `out`.
pub fn native<W: Write>(upper: &Path, out: W, opts: &DiffOptions) -> Result<(DiffReport, W)> {
    let root: OwnedFd = File::open(upper)
        .map_err(|e| Error::io("open upper", upper, e))?
        .into();
    let mut walk = Native {
        sink: Sink::new(out, opts)?,
        lowers: LowerView::new(opts.lowers.clone()),
        links: HashMap::new(),
        upper: upper.to_path_buf(),
    };
    walk.dir(root.as_fd(), b"", Some(Vec::new()), false)?;
    walk.sink.finish()
}

enum Source {
    Upper,
    Lower(Found),
}

struct Native<W: Write> {
    sink: Sink<W>,
    lowers: LowerView,
    /// First path written for each (dev, ino) with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
    upper: PathBuf,
}

impl<W: Write> Native<W> {
    fn err(&self, op: &'static str, rel: &[u8], e: std::io::Error) -> Error {
        use std::os::unix::ffi::OsStrExt;
        Error::io(op, self.upper.join(std::ffi::OsStr::from_bytes(rel)), e)
    }

    fn emit(&mut self, e: &Entry, data: Option<File>) -> Result<()> {
        let mut empty = std::io::empty();
        let r: &mut dyn Read = match data {
            Some(ref f) => &mut &*f,
            None => &mut empty,
        };
        let res = self.sink.tar.append(e, r);
        res.map_err(|err| self.err("write entry", &e.path, err))?;
        self.sink.entries += 1;
        Ok(())
    }

    /// Writes `e` as a hard link when its inode was written before; true if it did.
    fn link_seen(&mut self, e: &Entry, st: &libc::stat) -> Result<bool> {
        if st.st_nlink < 2 || e.kind == Kind::Dir {
            return Ok(false);
        }
        let key = (st.st_dev, st.st_ino);
        if let Some(first) = self.links.get(&key) {
            let mut l = Entry::new(e.path.clone(), Kind::HardLink);
            l.link = first.clone();
            l.mode = e.mode;
            l.uid = e.uid;
            l.gid = e.gid;
            l.mtime = e.mtime;
            l.mtime_nsec = e.mtime_nsec;
            self.emit(&l, None)?;
            return Ok(true);
        }
        self.links.insert(key, e.path.clone());
        Ok(false)
    }

    /// Walks upper directory `dir` at `rel`. `lower` is where its lower content lives (`None`
    /// when opaque); `relocated` means that content is not at `rel` in the lowers, so it must be
    /// written out too.
    fn dir(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        lower: Option<Vec<u8>>,
        relocated: bool,
    ) -> Result<()> {
        let mut names: Vec<(Vec<u8>, Source)> = sys::read_dir(dir)
            .map_err(|e| self.err("read dir", rel, e))?
            .into_iter()
            .map(|(n, _)| (n, Source::Upper))
            .collect();
        if relocated {
            if let Some(src) = &lower {
                let upper_names: std::collections::HashSet<Vec<u8>> =
                    names.iter().map(|(n, _)| n.clone()).collect();
                for (n, f) in self.lowers.read_dir(src)? {
                    if !upper_names.contains(&n) {
                        names.push((n, Source::Lower(f)));
                    }
                }
            }
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let present: std::collections::HashSet<Vec<u8>> =
            names.iter().map(|(n, _)| n.clone()).collect();
        for (name, source) in names {
            let path = entry::child(rel, &name);
            match source {
                // The OCI form in the upper: `.wh.NAME` deletes NAME unless the upper holds
                // NAME too, under the same rule as a char 0:0; the opaque marker is read with
                // its directory.
                Source::Upper => match whiteout::classify(&name) {
                    whiteout::Marker::Whiteout(n) => {
                        if lower.is_some() && !relocated && !present.contains(n) {
                            self.emit(&entry::whiteout(rel, n), None)?;
                        }
                    }
                    whiteout::Marker::Opaque => {}
                    whiteout::Marker::Plain => {
                        self.upper_entry(dir, rel, &name, path, lower.as_deref(), relocated)?
                    }
                },
                Source::Lower(found) => {
                    let src = entry::child(lower.as_deref().unwrap_or(b""), &name);
                    self.copy_lower(found, &src, path)?;
                }
            }
        }
        Ok(())
    }

    fn upper_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
        path: Vec<u8>,
        lower: Option<&[u8]>,
        relocated: bool,
    ) -> Result<()> {
        let cname = sys::cstr(name).map_err(|e| self.err("name", &path, e))?;
        let st = sys::lstatat(dir, &cname).map_err(|e| self.err("lstat", &path, e))?;
        if whiteout::is_whiteout_stat(&st) {
            // A whiteout only means something over lower content at this very path. Inside an
            // opaque or relocated directory (written as opaque) it must not be written: the
            // kernel lists whiteouts in directories that have no lower, so it would show up as
            // a name that cannot be looked up.
            if lower.is_some() && !relocated {
                return self.emit(&entry::whiteout(rel, name), None);
            }
            return Ok(());
        }
        let Some(read) = entry::read_native(dir, &cname, &st, path.clone())
            .map_err(|e| self.err("read metadata", &path, e))?
        else {
            return Ok(()); // a socket
        };
        let entry::Read {
            entry: e,
            overlay,
            fd,
        } = read;
        let upper_path = self.upper.join(String::from_utf8_lossy(&path).as_ref());
        let need_lowers = |feature| Error::NeedLowers {
            path: upper_path.clone(),
            feature,
        };
        match (e.kind, fd) {
            (Kind::Dir, Some(sub)) => {
                self.emit(&e, None)?;
                if let Some(r) = &overlay.redirect {
                    if self.lowers.is_empty() {
                        return Err(need_lowers("redirect"));
                    }
                    let src = resolve_redirect(r, lower.unwrap_or(rel));
                    self.emit(&entry::opaque(&path), None)?;
                    self.dir(sub.as_fd(), &path, Some(src), true)
                } else if overlay.opaque || has_opaque_marker(sub.as_fd()) {
                    self.emit(&entry::opaque(&path), None)?;
                    self.dir(sub.as_fd(), &path, None, false)
                } else {
                    let src = lower.map(|l| entry::child(l, name));
                    self.dir(sub.as_fd(), &path, src, relocated)
                }
            }
            (Kind::File, Some(fd)) => {
                if self.link_seen(&e, &st)? {
                    return Ok(());
                }
                let data = if overlay.metacopy {
                    if self.lowers.is_empty() {
                        return Err(need_lowers("metacopy"));
                    }
                    let src = match &overlay.redirect {
                        Some(r) => resolve_redirect(r, lower.unwrap_or(rel)),
                        None => entry::child(lower.unwrap_or(rel), name),
                    };
                    self.lower_data(&src)?
                } else {
                    File::from(fd)
                };
                self.emit(&e, Some(data))
            }
            _ => {
                if self.link_seen(&e, &st)? {
                    return Ok(());
                }
                self.emit(&e, None)
            }
        }
    }

    fn lower_data(&self, src: &[u8]) -> Result<File> {
        let missing = || {
            Error::Invalid(format!(
                "metacopy origin {:?} not found in the lowers",
                String::from_utf8_lossy(src)
            ))
        };
        let found = self.lowers.lookup(src)?.ok_or_else(missing)?;
        if found.st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(missing());
        }
        let base = src.rsplit(|&b| b == b'/').next().unwrap_or(b"");
        let cname = sys::cstr(base).map_err(|e| self.err("name", src, e))?;
        entry::open(found.dir.as_fd(), &cname).map_err(|e| self.err("open lower", src, e))
    }

    /// Writes the merged lower entry `src` (and, for a directory, everything below it) at `dst`.
    fn copy_lower(&mut self, found: Found, src: &[u8], dst: Vec<u8>) -> Result<()> {
        let base = src.rsplit(|&b| b == b'/').next().unwrap_or(b"");
        let cname = sys::cstr(base).map_err(|e| self.err("name", src, e))?;
        let layer_path = |lv: &LowerView| lv.layers()[found.layer].clone();
        let Some(e) = entry::read(found.dir.as_fd(), &cname, &found.st, dst.clone())
            .map_err(|e| Error::io("read lower metadata", layer_path(&self.lowers), e))?
        else {
            return Ok(());
        };
        match e.kind {
            Kind::Dir => {
                self.emit(&e, None)?;
                for (n, f) in self.lowers.read_dir(src)? {
                    self.copy_lower(f, &entry::child(src, &n), entry::child(&dst, &n))?;
                }
                Ok(())
            }
            Kind::File => {
                if self.link_seen(&e, &found.st)? {
                    return Ok(());
                }
                if entry::overlay_xattr(found.dir.as_fd(), &cname, XattrNs::metacopy)
                    .map_err(|e| Error::io("getxattr", layer_path(&self.lowers), e))?
                    .is_some()
                {
                    return Err(Error::LowerOverlayXattr {
                        path: layer_path(&self.lowers).join(String::from_utf8_lossy(src).as_ref()),
                        xattr: "overlay.metacopy".into(),
                    });
                }
                let f = entry::open(found.dir.as_fd(), &cname)
                    .map_err(|e| Error::io("open lower", layer_path(&self.lowers), e))?;
                self.emit(&e, Some(f))
            }
            _ => {
                if self.link_seen(&e, &found.st)? {
                    return Ok(());
                }
                self.emit(&e, None)
            }
        }
    }
}

/// An `overlay.redirect` value as a path relative to the layer roots: absolute values are from
/// the root; relative ones name a sibling in the parent's lower directory.
fn resolve_redirect(value: &[u8], parent_lower: &[u8]) -> Vec<u8> {
    let value = value.strip_suffix(b"\0").unwrap_or(value);
    match value.strip_prefix(b"/") {
        Some(abs) => abs.to_vec(),
        None => entry::child(parent_lower, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve() {
        assert_eq!(resolve_redirect(b"/a/b", b"x"), b"a/b");
        assert_eq!(resolve_redirect(b"old", b"x/y"), b"x/y/old");
        assert_eq!(resolve_redirect(b"old", b""), b"old");
    }
}
