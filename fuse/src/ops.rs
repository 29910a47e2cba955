//! The union's changes, as overlayfs makes them, each a function returning `Result<_, Errno>`
//! (the glue in `fs` only replies):
//!
//! - **copy-up**: before a lower entry is changed, it is copied into the upper: parents first
//!   (directories with their owner, mode, times and xattrs), then the entry itself, built in the
//!   work dir and renamed into place, so a crash never leaves half a file visible; data moves
//!   with `copy_file_range` (a reflink where the filesystem has them), holes left holes; every
//!   copy keeps showing its origin's inode number (see [`crate::ino`]);
//! - **deletion** of a name a lower layer still shows writes a whiteout (char 0:0; where the
//!   caller may not make devices, the `.wh.NAME` form);
//! - a directory made where a whiteout was is **opaque**, so the lower one stays hidden;
//! - **rename** of a directory from a lower layer copies the merged tree up and marks it
//!   opaque (so renames never fail with EXDEV, and the result reads the same under kernel
//!   overlay), then whites out the old name.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fuser::Errno;
use nix::sys::stat::{Mode, SFlag};
use strata_overlay::whiteout::{OPAQUE_MARKER, OPAQUE_VALUE, XattrNs, is_overlay_xattr};

use crate::ino::Inos;
use crate::layer::{Resolved, Stack, whiteout_name};

/// A char 0:0: a whiteout in the kernel's form.
fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

pub(crate) fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A nix error as the errno a reply carries.
pub(crate) fn nix_errno(e: nix::Error) -> Errno {
    Errno::from_i32(e as i32)
}

/// The writable side of a union: its upper and work dirs.
pub struct Upper {
    /// The upper layer's root (layer 0 of the stack).
    pub root: PathBuf,
    /// The work dir, on the upper's filesystem.
    pub work: PathBuf,
    /// Where opaque markers go: `trusted.` as root of the initial user namespace, `user.`
    /// otherwise (as kernel overlay's `userxattr` mounts do).
    pub ns: XattrNs,
    /// The union's inode numbers: copies are noted there.
    inos: Arc<Inos>,
    counter: AtomicU64,
    /// Nothing is synced (kernel overlay's `volatile`): copy-ups are renamed into place
    /// unsynced and fsync is answered at once. See [`Upper::prepare`].
    pub volatile: bool,
    /// The stack's flag for OCI markers in the upper (see [`Stack::upper_markers`]): raised
    /// before this writes one.
    markers: Arc<AtomicBool>,
}

impl Upper {
    /// The upper `root` with its `work` dir; copies are noted in `inos`; `markers` is raised
    /// before an OCI marker is written.
    pub fn new(root: PathBuf, work: PathBuf, inos: Arc<Inos>, markers: Arc<AtomicBool>) -> Upper {
        let ns = if crate::privileged() {
            XattrNs::Trusted
        } else {
            XattrNs::User
        };
        Upper {
            root,
            work,
            ns,
            inos,
            counter: AtomicU64::new(0),
            volatile: false,
            markers,
        }
    }

    /// Readies the work dir for a mount, as kernel overlay does: refuses while the mark of an
    /// earlier volatile mount is there, and leaves that mark when this mount is volatile.
    pub fn prepare(&self) -> std::io::Result<()> {
        let marker = strata_overlay::mount::volatile_marker(&self.work);
        if std::fs::symlink_metadata(&marker).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: the upper {} was last mounted volatile (without syncs) and may have lost writes in a crash; discard the upper and work dirs, or remove this directory if the upper is known intact",
                    marker.display(),
                    self.root.display()
                ),
            ));
        }
        if self.volatile {
            std::fs::create_dir_all(&marker)?;
        }
        Ok(())
    }

    fn tmp(&self) -> PathBuf {
        self.work.join(format!(
            "#strata-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// Copies owner, xattrs (overlay's own excepted), mode and times of `src` (with `st`) to `dst`.
fn copy_meta(src: &Path, dst: &Path, st: &std::fs::Metadata) -> Result<(), Errno> {
    let _ = std::os::unix::fs::lchown(dst, Some(st.uid()), Some(st.gid()));
    if let Ok(list) = crate::sys::llistxattr(src) {
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if is_overlay_xattr(name) {
                continue;
            }
            let n = OsStr::from_bytes(name);
            if let Ok(v) = crate::sys::lgetxattr(src, n) {
                let _ = crate::sys::lsetxattr(dst, n, &v);
            }
        }
    }
    if !st.file_type().is_symlink() {
        std::fs::set_permissions(
            dst,
            std::os::unix::fs::PermissionsExt::from_mode(st.mode() & 0o7777),
        )
        .map_err(errno)?;
    }
    let t = |s: i64, ns: i64| nix::sys::time::TimeSpec::new(s, ns);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &t(st.atime(), st.atime_nsec()),
        &t(st.mtime(), st.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_errno)
}

/// Copies the data of regular file `src` into the new file `dst`, and syncs it: the copy is
/// renamed into the upper next, and a crash, power loss included, must not leave a name there
/// whose data never reached the disk (kernel overlay syncs its copies too, unless `volatile`).
/// `sync` false: the caller syncs the whole filesystem once instead (a tree's copy), or
/// nothing is synced (a volatile mount).
fn copy_data(src: &Path, dst: &Path, sync: bool) -> Result<(), Errno> {
    let s = std::fs::File::open(src).map_err(errno)?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(errno)?;
    // Holes stay holes, as in kernel overlay's copies.
    strata_overlay::tree::copy_sparse(&s, &d).map_err(errno)?;
    if sync {
        let _off = crate::threads::DiskWait::begin();
        d.sync_all().map_err(errno)?;
    }
    Ok(())
}

impl Upper {
    /// Makes every directory of `rel` (a path in the merged view) exist in the upper,
    /// copying each one's metadata from the layer that shows it.
    pub fn ensure_dir(&self, stack: &Stack, rel: &Path) -> Result<(), Errno> {
        // Most often it is there already, and so are all its parents: one lstat.
        if std::fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        let mut at = PathBuf::new();
        for comp in rel.components() {
            at.push(comp);
            let here = self.root.join(&at);
            if std::fs::symlink_metadata(&here).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let r = stack.resolve(&at).ok_or(Errno::ENOENT)?;
            let Resolved::Dir { .. } = r else {
                return Err(Errno::ENOTDIR);
            };
            let src = stack.path(r.layer(), &at);
            let meta = std::fs::symlink_metadata(&src).map_err(errno)?;
            let tmp = self.tmp();
            std::fs::create_dir(&tmp).map_err(errno)?;
            let made = copy_meta(&src, &tmp, &meta)
                .and_then(|()| self.note_copy(&meta, &tmp))
                .and_then(|()| std::fs::rename(&tmp, &here).map_err(errno));
            if let Err(e) = made {
                let _ = std::fs::remove_dir(&tmp);
                return Err(e);
            }
        }
        Ok(())
    }

    /// `copy` (about to be renamed into place) is a copy of the entry `source` describes: it
    /// shows `source`'s inode number from now on.
    fn note_copy(&self, source: &std::fs::Metadata, copy: &Path) -> Result<(), Errno> {
        let c = std::fs::symlink_metadata(copy).map_err(errno)?;
        self.inos
            .copied((source.dev(), source.ino()), (c.dev(), c.ino()));
        Ok(())
    }

    /// Copies `rel` up into the upper if it is not there yet (directories: the directory
    /// itself, not its contents). A hard-linked file's other names are linked to the copy.
    pub fn copy_up(&self, stack: &Stack, rel: &Path) -> Result<(), Errno> {
        self.copy_up_with(stack, rel, None, !self.volatile)
    }

    /// [`Upper::copy_up`] of `rel`, which a lookup just found as `known`: unless the upper
    /// has changed at `rel` since, no second walk through the layers (lowers don't change).
    pub fn copy_up_known(&self, stack: &Stack, rel: &Path, known: Resolved) -> Result<(), Errno> {
        self.copy_up_with(stack, rel, Some(known), !self.volatile)
    }

    /// [`Upper::copy_up`]; `sync` false leaves a file's data for one `syncfs` by the caller.
    fn copy_up_with(
        &self,
        stack: &Stack,
        rel: &Path,
        known: Option<Resolved>,
        sync: bool,
    ) -> Result<(), Errno> {
        // Already in the upper (the top layer, so it is what the merged view shows): nothing to
        // do, and no walk through the layers to find that out.
        let known = match std::fs::symlink_metadata(self.root.join(rel)) {
            Ok(m) if !is_whiteout(&m) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => known,
            _ => None,
        };
        let r = match known {
            Some(r) => r,
            None => stack.resolve(rel).ok_or(Errno::ENOENT)?,
        };
        if r.layer() == 0 {
            return Ok(());
        }
        if let Resolved::Dir { .. } = r {
            return self.ensure_dir(stack, rel);
        }
        if let Some(p) = rel.parent() {
            self.ensure_dir(stack, p)?;
        }
        let src = stack.path(r.layer(), rel);
        let meta = std::fs::symlink_metadata(&src).map_err(errno)?;
        let tmp = self.tmp();
        let ft = meta.file_type();
        let made = (|| {
            if ft.is_file() {
                copy_data(&src, &tmp, sync)?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&src).map_err(errno)?;
                std::os::unix::fs::symlink(target, &tmp).map_err(errno)?;
            } else {
                nix::sys::stat::mknod(
                    &tmp,
                    SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT),
                    Mode::from_bits_truncate(meta.mode() & 0o7777),
                    meta.rdev(),
                )
                .map_err(nix_errno)?;
            }
            copy_meta(&src, &tmp, &meta)?;
            self.note_copy(&meta, &tmp)?;
            std::fs::rename(&tmp, self.root.join(rel)).map_err(errno)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if ft.is_file() && meta.nlink() > 1 {
            self.link_up(stack, r.layer(), rel, &meta)?;
        }
        Ok(())
    }

    /// After a copy-up of a hard-linked lower file: every other name the merged view still
    /// shows for that lower file becomes a link to the copy, so the names stay one file (as
    /// kernel overlay keeps them with `index=on`), in the merged view and in the layer diff.
    fn link_up(
        &self,
        stack: &Stack,
        layer: usize,
        rel: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<(), Errno> {
        for other in stack.link_names(layer, (meta.dev(), meta.ino())) {
            if other == rel {
                continue;
            }
            let same = matches!(stack.resolve(&other), Some(Resolved::File { layer: l, stat })
                if l == layer && stat.st_ino == meta.ino() && stat.st_dev == meta.dev());
            if !same {
                continue; // deleted, replaced or already copied up on its own
            }
            if let Some(p) = other.parent() {
                self.ensure_dir(stack, p)?;
            }
            std::fs::hard_link(self.root.join(rel), self.root.join(&other)).map_err(errno)?;
        }
        Ok(())
    }

    /// Copies the whole merged tree at `rel` (a directory) into the upper and marks the upper
    /// copy opaque: it is complete, nothing below may show through it any more.
    /// The files' data is synced with one `syncfs` of the upper's filesystem, before the copy
    /// is marked opaque (one sync per file made renaming a large lower directory slow).
    pub fn copy_up_tree(&self, stack: &Stack, rel: &Path) -> Result<(), Errno> {
        let mut dirs = Vec::new();
        self.copy_tree(stack, rel, &mut dirs)?;
        if !self.volatile {
            let root = std::fs::File::open(&self.root).map_err(errno)?;
            let _off = crate::threads::DiskWait::begin();
            nix::unistd::syncfs(&root).map_err(nix_errno)?;
        }
        for d in dirs {
            self.set_opaque(&self.root.join(d))?;
        }
        Ok(())
    }

    /// Copies the tree at `rel` up, noting its directories in `dirs` (to be marked opaque).
    fn copy_tree(&self, stack: &Stack, rel: &Path, dirs: &mut Vec<PathBuf>) -> Result<(), Errno> {
        self.copy_up_with(stack, rel, None, false)?;
        let Some(Resolved::Dir { layers, .. }) = stack.resolve(rel) else {
            return Err(Errno::ENOTDIR);
        };
        for (name, e) in stack.read_dir(&layers, rel).map_err(errno)?.entries {
            let child = rel.join(&name);
            if e.kind() == libc::S_IFDIR {
                self.copy_tree(stack, &child, dirs)?;
            } else {
                self.copy_up_with(stack, &child, None, false)?;
            }
        }
        dirs.push(rel.to_path_buf());
        Ok(())
    }

    /// Marks an upper directory opaque: with the opaque xattr, or where the filesystem refuses
    /// it, with the OCI form's `.wh..wh..opq` file (as whiteouts fall back to `.wh.NAME`).
    pub fn set_opaque(&self, dir: &Path) -> Result<(), Errno> {
        let name = OsStr::from_bytes(self.ns.opaque().to_bytes());
        match crate::sys::lsetxattr(dir, name, OPAQUE_VALUE) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOTSUP | libc::EACCES)
                ) =>
            {
                self.markers.store(true, Ordering::SeqCst);
                std::fs::write(dir.join(OsStr::from_bytes(OPAQUE_MARKER)), b"").map_err(errno)
            }
            Err(e) => Err(errno(e)),
        }
    }

    /// Removes a whiteout for `rel` from the upper (either form); true if there was one.
    pub fn clear_whiteout(&self, rel: &Path) -> Result<bool, Errno> {
        if std::fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| is_whiteout(&m)) {
            self.drop_whiteout(rel)?;
            return Ok(true);
        }
        self.clear_oci_whiteout(rel)
    }

    /// Removes the whiteout (char 0:0) known to be at `rel` in the upper, and the OCI form's
    /// beside it if any.
    pub fn drop_whiteout(&self, rel: &Path) -> Result<(), Errno> {
        std::fs::remove_file(self.root.join(rel)).map_err(errno)?;
        self.clear_oci_whiteout(rel).map(|_| ())
    }

    /// Removes the OCI form's whiteout for `rel` (`.wh.NAME`) from the upper; true if there
    /// was one. No system call while the upper holds no such markers.
    pub fn clear_oci_whiteout(&self, rel: &Path) -> Result<bool, Errno> {
        if !self.markers.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let name = rel.file_name().ok_or(Errno::EINVAL)?;
        let oci = self.root.join(rel).with_file_name(whiteout_name(name));
        if std::fs::symlink_metadata(&oci).is_ok() {
            std::fs::remove_file(&oci).map_err(errno)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes a whiteout for `rel` in the upper (its parent must exist there): a hard link of
    /// one shared char 0:0 in the work dir, as kernel overlay makes them (a link is cheaper
    /// than a device node, and a deleted tree costs one inode, not one per name).
    pub fn whiteout(&self, rel: &Path) -> Result<(), Errno> {
        let here = self.root.join(rel);
        let shared = self.work.join("#strata-whiteout");
        for _ in 0..3 {
            match std::fs::hard_link(&shared, &here) {
                Ok(()) => return Ok(()),
                // None yet, or it has all the links its filesystem allows: a new one.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EMLINK)) => {}
                Err(e) => return Err(errno(e)),
            }
            let tmp = self.tmp();
            match nix::sys::stat::mknod(&tmp, SFlag::S_IFCHR, Mode::empty(), 0) {
                Ok(()) => std::fs::rename(&tmp, &shared).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    errno(e)
                })?,
                // Not allowed to make devices: the OCI form, which this filesystem reads too.
                Err(nix::errno::Errno::EPERM) => {
                    self.markers.store(true, Ordering::SeqCst);
                    let name = rel.file_name().ok_or(Errno::EINVAL)?;
                    return std::fs::write(here.with_file_name(whiteout_name(name)), b"")
                        .map_err(errno);
                }
                Err(e) => return Err(nix_errno(e)),
            }
        }
        Err(Errno::EMLINK)
    }

    /// Removes an upper directory that holds nothing but whiteouts and markers.
    pub fn remove_dir(&self, dir: &Path) -> Result<(), Errno> {
        for e in std::fs::read_dir(dir).map_err(errno)? {
            let e = e.map_err(errno)?;
            let p = e.path();
            let ft = e.file_type().map_err(errno)?;
            if ft.is_dir() {
                self.remove_dir(&p)?;
            } else {
                std::fs::remove_file(&p).map_err(errno)?;
            }
        }
        std::fs::remove_dir(dir).map_err(errno)
    }
}

use std::os::unix::fs::FileTypeExt;
