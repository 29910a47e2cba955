//! Applying an OCI layer blob into a directory in overlayfs' native form.
//!
//! The blob is streamed once: the raw bytes are hashed for the blob digest, decompressed (by
//! magic bytes), hashed again for the diffID, and the tar entries are written into a temporary
//! sibling of the target that is renamed into place only when everything succeeded and the
//! digests match. Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! below the temporary root and every final component is created without following symlinks,
//! so no entry can write outside the target, whatever the archive holds.

use std::cell::Cell;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::archive::{Entry, Kind, Reader};
use crate::compress::{self, Compression};
use crate::digest::{Digest, HashReader};
use crate::sys;
use crate::whiteout::{self, Marker, XattrNs};
use crate::{Error, Result};

/// Default cap on a layer's uncompressed size: 64 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Namespace of the opaque xattr written for `.wh..wh..opq`.
    pub xattr_ns: XattrNs,
    /// Rootless: device nodes are skipped and failed chowns or privileged xattrs are warnings.
    pub rootless: bool,
    /// The diffID the uncompressed stream must have.
    pub expected_diff_id: Option<Digest>,
    /// The digest the blob must have.
    pub expected_digest: Option<Digest>,
    /// Cap on the uncompressed size.
    pub max_size: u64,
    /// The complete stack of lower layers this layer will sit on (top first; empty for a bottom
    /// layer), when known. Directories the tar implies but does not contain then get their mode
    /// and owner from the topmost lower that has them, as containerd does, and whiteouts of
    /// paths no lower has are dropped: the kernel lists a whiteout with nothing below it as a
    /// name that cannot be looked up. `None`: unknown, every whiteout is kept.
    pub parents: Option<Vec<PathBuf>>,
    /// With `parents` `None`: the lowers are not there yet but will be (a pull applies its
    /// layers side by side while they download). What depends on them, whiteouts and the
    /// directories the tar implies, is kept as if they were unknown and listed in
    /// [`ApplyReport::deferred`], for [`settle_lowers`] to finish once they are.
    pub defer_lowers: bool,
    /// `syncfs` the target before returning, so an acknowledged apply survives a crash.
    pub sync: bool,
    /// Write deletions and opaque directories in the OCI form (`.wh.NAME` files, a
    /// `.wh..wh..opq` file), for filesystems that refuse overlay's char 0:0 whiteouts (an
    /// overlayfs, which the FUSE union serves from). Only the FUSE union reads such a layer;
    /// `form::convert` turns it into the kernel's form.
    pub wh: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            xattr_ns: XattrNs::Trusted,
            rootless: false,
            expected_diff_id: None,
            expected_digest: None,
            max_size: DEFAULT_MAX_SIZE,
            parents: None,
            defer_lowers: false,
            sync: true,
            wh: false,
        }
    }
}

impl ApplyOptions {
    /// Options for rootless use: `user.overlay.` xattrs, devices skipped.
    pub fn rootless() -> Self {
        ApplyOptions {
            xattr_ns: XattrNs::User,
            rootless: true,
            ..Default::default()
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The blob's compression.
    pub compression: Compression,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// sha256 of the blob as read.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Size of the uncompressed stream in bytes.
    pub uncompressed: u64,
    /// Number of tar entries applied.
    pub entries: u64,
    /// Things skipped in rootless mode.
    pub warnings: Vec<String>,
    /// With [`ApplyOptions::defer_lowers`]: what waits for the lowers.
    pub deferred: Deferred,
}

/// What an apply left for [`settle_lowers`]: paths relative to the layer root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deferred {
    /// Whiteouts written without knowing whether a lower has the path.
    pub whiteouts: Vec<Vec<u8>>,
    /// The whiteouts are `.wh.NAME` files ([`ApplyOptions::wh`]), not char 0:0 devices.
    pub wh: bool,
    /// Directories the tar implied but did not contain (made 0755 root:root), topmost last.
    pub implied_dirs: Vec<Vec<u8>>,
}

impl Deferred {
    /// True when nothing waits for the lowers.
    pub fn is_empty(&self) -> bool {
        self.whiteouts.is_empty() && self.implied_dirs.is_empty()
    }
}

/// Finishes a layer applied with [`ApplyOptions::defer_lowers`] now that its lowers are known
/// (`parents`, top first, as [`ApplyOptions::parents`]): whiteouts of paths no lower has are
/// removed and implied directories take their mode and owner from the topmost lower that has
/// them, so the layer ends as an apply with `parents` would have left it. Every path is
/// resolved beneath `layer` without following symlinks; directory times are kept.
pub fn settle_lowers(
    layer: &Path,
    parents: &[PathBuf],
    deferred: &Deferred,
    rootless: bool,
) -> Result<()> {
    if deferred.is_empty() {
        return Ok(());
    }
    let root = File::open(layer).map_err(|e| Error::io("open", layer, e))?;
    let view = crate::diff::LowerView::new(parents.to_vec());
    let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW;
    let open_parent = |rel: &[u8]| -> io::Result<OwnedFd> {
        match rel.iter().rposition(|&b| b == b'/') {
            None => sys::openat(root.as_fd(), c".", flags, 0),
            Some(i) => sys::open_beneath(root.as_fd(), &sys::cstr(&rel[..i])?, flags, 0),
        }
    };
    let at = |rel: &[u8], what: &'static str, err: io::Error| {
        Error::io(what, layer.join(bytes_path(rel)), err)
    };
    for rel in &deferred.whiteouts {
        if parents.is_empty() || view.lookup(rel)?.is_none() {
            let Some(dir) = gone_is_none(open_parent(rel)).map_err(|e| at(rel, "open", e))? else {
                continue;
            };
            let base = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
            let (name, still) = if deferred.wh {
                let name = sys::cstr(&whiteout::wh_name(base)).map_err(|e| at(rel, "name", e))?;
                let st = sys::lstatat(dir.as_fd(), &name);
                (
                    name,
                    st.is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG),
                )
            } else {
                let name = sys::cstr(base).map_err(|e| at(rel, "name", e))?;
                let st = sys::lstatat(dir.as_fd(), &name);
                (name, st.is_ok_and(|st| whiteout::is_whiteout_stat(&st)))
            };
            if !still {
                continue;
            }
            let times = sys::lstatat(dir.as_fd(), c"").map_err(|e| at(rel, "stat", e))?;
            sys::unlinkat(dir.as_fd(), &name, 0).map_err(|e| at(rel, "remove whiteout", e))?;
            sys::lutimesat(dir.as_fd(), c"", times.st_mtime, times.st_mtime_nsec as u32)
                .map_err(|e| at(rel, "set times", e))?;
        }
    }
    for rel in &deferred.implied_dirs {
        let Some((mode, uid, gid)) = lower_dir_meta(parents, rel) else {
            continue;
        };
        let name = sys::cstr(rel).map_err(|e| at(rel, "name", e))?;
        let opened = sys::open_beneath(root.as_fd(), &name, flags, 0);
        let Some(fd) = gone_is_none(opened).map_err(|e| at(rel, "open", e))? else {
            continue;
        };
        if !(rootless && (uid, gid) != (0, 0)) {
            sys::lchownat(fd.as_fd(), c"", uid, gid).map_err(|e| at(rel, "chown", e))?;
        }
        sys::fchmod(fd.as_fd(), mode).map_err(|e| at(rel, "chmod", e))?;
    }
    sys::syncfs(root.as_fd()).map_err(|e| Error::io("syncfs", layer, e))
}

/// `None` for a path that went away (or became a symlink) later in the same layer: nothing to
/// settle there.
fn gone_is_none(r: io::Result<OwnedFd>) -> io::Result<Option<OwnedFd>> {
    match r {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn bytes_path(b: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(b))
}

/// Mode and owner of directory `rel` in the topmost of `lowers` that has it.
fn lower_dir_meta(lowers: &[PathBuf], rel: &[u8]) -> Option<(u32, u32, u32)> {
    lowers.iter().find_map(|lower| {
        let m = std::fs::symlink_metadata(lower.join(bytes_path(rel))).ok()?;
        m.is_dir().then(|| (m.mode() & 0o7777, m.uid(), m.gid()))
    })
}

/// Applies the layer blob at `blob` into `target` (see [`apply`]).
pub fn apply_file(blob: &Path, target: &Path, opts: &ApplyOptions) -> Result<ApplyReport> {
    let f = File::open(blob).map_err(|e| Error::io("open layer", blob, e))?;
    apply(io::BufReader::with_capacity(256 << 10, f), target, opts)
}

/// Applies a layer blob (tar, tar+gzip or tar+zstd) into `target`, which must not exist or be
/// an empty directory. On any error nothing is left behind and `target` is as it was.
pub fn apply<R: Read>(blob: R, target: &Path, opts: &ApplyOptions) -> Result<ApplyReport> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target.file_name().ok_or_else(|| Error::Target {
        path: target.into(),
        reason: "has no file name".into(),
    })?;
    match std::fs::symlink_metadata(target) {
        Ok(m) if !m.is_dir() => {
            return Err(Error::Target {
                path: target.into(),
                reason: "exists and is not a directory".into(),
            });
        }
        Ok(_) => {
            let mut it = std::fs::read_dir(target).map_err(|e| Error::io("read", target, e))?;
            if it.next().is_some() {
                return Err(Error::Target {
                    path: target.into(),
                    reason: "exists and is not empty".into(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("stat", target, e)),
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{}.strata-apply-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        stamp.as_nanos()
    ));
    std::fs::create_dir(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    let result = apply_into_tmp(blob, &tmp, opts).and_then(|report| {
        std::fs::rename(&tmp, target).map_err(|e| Error::io("rename into place", target, e))?;
        if opts.sync {
            let dir = File::open(parent).map_err(|e| Error::io("open", parent, e))?;
            sys::syncfs(dir.as_fd()).map_err(|e| Error::io("syncfs", parent, e))?;
        }
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn apply_into_tmp<R: Read>(blob: R, tmp: &Path, opts: &ApplyOptions) -> Result<ApplyReport> {
    std::fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| Error::io("chmod", tmp, e))?;
    let root = sys::openat(
        File::open(tmp)
            .map_err(|e| Error::io("open", tmp, e))?
            .as_fd(),
        c".",
        libc::O_DIRECTORY | libc::O_RDONLY,
        0,
    )
    .map_err(|e| Error::io("open", tmp, e))?;
    let mut raw = HashReader::new(blob);
    let over = Rc::new(Cell::new(false));
    let (compression, uncompressed, diff_id, deferred, entries, warnings) = {
        let (compression, decoded) = compress::decoder(&mut raw).map_err(Error::Stream)?;
        let capped = Capped {
            inner: decoded,
            left: opts.max_size,
            over: over.clone(),
        };
        // A plain tar's diffID is its digest: hash it once.
        let plain = if compression == Compression::None {
            HashReader::counting(capped)
        } else {
            HashReader::new(capped)
        };
        let mut tar = Reader::new(plain);
        let mut applier = Applier::new(root, opts);
        let run = (|| -> Result<()> {
            while let Some(entry) = tar.next_entry()? {
                applier.entry(&entry, &mut tar)?;
            }
            Ok(())
        })();
        let cap = |e: Error| {
            if over.get() {
                Error::TooLarge { cap: opts.max_size }
            } else {
                e
            }
        };
        run.map_err(cap)?;
        // Drain what follows the end-of-archive marker so both digests cover the whole blob
        // (and gzip's trailer is checked).
        let (diff_id, uncompressed) = tar
            .into_inner()
            .finish()
            .map_err(|e| cap(Error::Stream(e)))?;
        applier.finish()?;
        (
            compression,
            uncompressed,
            diff_id,
            applier.deferred(),
            applier.entries,
            applier.warnings,
        )
    };
    let (digest, size) = raw.finish().map_err(Error::Stream)?;
    let digest = digest.expect("the raw stream is hashed");
    let diff_id = diff_id.unwrap_or(digest);
    check("diffID", opts.expected_diff_id, diff_id)?;
    check("digest", opts.expected_digest, digest)?;
    Ok(ApplyReport {
        compression,
        diff_id,
        digest,
        size,
        uncompressed,
        entries,
        warnings,
        deferred,
    })
}

fn check(what: &'static str, expected: Option<Digest>, actual: Digest) -> Result<()> {
    match expected {
        Some(e) if e != actual => Err(Error::DigestMismatch {
            what,
            expected: e.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Stops reading past `left` bytes.
struct Capped<R> {
    inner: R,
    left: u64,
    over: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.over.set(true);
            return Err(io::Error::other("layer exceeds its size cap"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A path split into validated components.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>> {
    if raw.contains(&0) {
        return Err(Error::refused(raw, "name contains a NUL byte"));
    }
    if raw.first() == Some(&b'/') {
        return Err(Error::refused(raw, "absolute path"));
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Error::refused(raw, "path contains '..'")),
            c => out.push(c),
        }
    }
    if out.iter().map(|c| c.len() + 1).sum::<usize>() > 4096 {
        return Err(Error::refused(raw, "path longer than PATH_MAX (4096)"));
    }
    Ok(out)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

struct Applier<'o> {
    /// The temp root; shared with the cache without dup(2)ing it.
    root: Rc<OwnedFd>,
    opts: &'o ApplyOptions,
    /// Directories whose times are set at the end, after their children.
    dirs: Vec<(Vec<u8>, i64, u32)>,
    /// The last parent directory opened, by path.
    cached: Option<(Vec<u8>, Rc<OwnedFd>)>,
    /// Directories this layer marked opaque.
    opaque: std::collections::HashSet<Vec<u8>>,
    /// The merged view of the known lowers, opened on first use.
    lowers: Option<crate::diff::LowerView>,
    entries: u64,
    warnings: Vec<String>,
    buf: Vec<u8>,
    /// `defer_lowers`: whiteouts kept for want of lowers.
    deferred_whiteouts: Vec<Vec<u8>>,
    /// `defer_lowers`: directories made for implied parents and not described since.
    implied: std::collections::BTreeSet<Vec<u8>>,
}

impl<'o> Applier<'o> {
    fn new(root: OwnedFd, opts: &'o ApplyOptions) -> Self {
        Applier {
            root: Rc::new(root),
            opts,
            dirs: Vec::new(),
            cached: None,
            opaque: Default::default(),
            lowers: None,
            entries: 0,
            warnings: Vec::new(),
            buf: vec![0; 256 << 10],
            deferred_whiteouts: Vec::new(),
            implied: Default::default(),
        }
    }

    fn deferred(&mut self) -> Deferred {
        let mut implied: Vec<Vec<u8>> = std::mem::take(&mut self.implied).into_iter().collect();
        // Parents sort before their children; settle them top-down either way.
        implied.sort();
        Deferred {
            whiteouts: std::mem::take(&mut self.deferred_whiteouts),
            wh: self.opts.wh,
            implied_dirs: implied,
        }
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        if self.warnings.len() < 1000 {
            self.warnings.push(msg);
        }
    }

    fn entry<R: Read>(&mut self, e: &Entry, tar: &mut Reader<R>) -> Result<()> {
        self.entries += 1;
        // A size no stream under the cap can deliver: refused before reading any of it (a
        // sparse file's logical size may exceed what its stream carries).
        if e.size > self.opts.max_size && e.sparse.is_none() {
            return Err(Error::TooLarge {
                cap: self.opts.max_size,
            });
        }
        let comps = components(&e.path)?;
        let Some((&base, parent)) = comps.split_last() else {
            // The root itself ("./"): only a directory may describe it.
            if e.kind != Kind::Dir {
                return Err(Error::refused(
                    &e.path,
                    "the layer root must be a directory",
                ));
            }
            let root = self.root.clone();
            return self.dir_meta(e, root.as_fd(), Vec::new());
        };
        match whiteout::classify(base) {
            Marker::Opaque => {
                let dir = self.parent(&e.path, parent)?;
                if self.opts.wh {
                    let marker = sys::cstr(whiteout::OPAQUE_MARKER)
                        .map_err(|err| Error::entry(&e.path, "name", err))?;
                    self.empty_file(dir.as_fd(), &marker)
                        .map_err(|err| Error::entry(&e.path, "create opaque marker", err))?;
                } else {
                    let attr = self.opts.xattr_ns.opaque();
                    sys::fsetxattr(dir.as_fd(), attr, whiteout::OPAQUE_VALUE)
                        .map_err(|err| Error::entry(&e.path, "set opaque xattr", err))?;
                }
                // Whiteouts this layer put in the directory before the marker now hide nothing,
                // and the kernel would list them in a directory without lowers.
                for (child, kind) in sys::read_dir(dir.as_fd())
                    .map_err(|err| Error::entry(&e.path, "read dir", err))?
                {
                    if let Marker::Whiteout(_) = whiteout::classify(&child) {
                        let c =
                            sys::cstr(&child).map_err(|err| Error::entry(&e.path, "name", err))?;
                        sys::unlinkat(dir.as_fd(), &c, 0)
                            .map_err(|err| Error::entry(&e.path, "remove whiteout", err))?;
                    } else if kind == libc::DT_CHR {
                        let c =
                            sys::cstr(&child).map_err(|err| Error::entry(&e.path, "name", err))?;
                        if sys::lstatat(dir.as_fd(), &c)
                            .is_ok_and(|st| whiteout::is_whiteout_stat(&st))
                        {
                            sys::unlinkat(dir.as_fd(), &c, 0)
                                .map_err(|err| Error::entry(&e.path, "remove whiteout", err))?;
                        }
                    }
                }
                self.opaque.insert(join(parent));
                return Ok(());
            }
            Marker::Whiteout(name) => {
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(Error::refused(&e.path, "whiteout of '.', '..' or nothing"));
                }
                if name.starts_with(whiteout::WHITEOUT_PREFIX) {
                    return Err(Error::refused(&e.path, "whiteout of a whiteout name"));
                }
                let dir = self.parent(&e.path, parent)?;
                let cname = sys::cstr(name).map_err(|err| Error::entry(&e.path, "name", err))?;
                self.remove_existing(&e.path, dir.as_fd(), &cname)?;
                if self.opaque.contains(&join(parent))
                    || !self.in_lowers(&e.path, &[parent, &[name]].concat())?
                {
                    // Nothing below to hide: in a directory this layer made opaque, or a path
                    // none of the (known) lowers has.
                    return Ok(());
                }
                if self.opts.wh {
                    let wh = sys::cstr(&whiteout::wh_name(name))
                        .map_err(|err| Error::entry(&e.path, "name", err))?;
                    self.empty_file(dir.as_fd(), &wh)
                        .map_err(|err| Error::entry(&e.path, "create whiteout (.wh. file)", err))?;
                } else {
                    sys::mknodat(dir.as_fd(), &cname, libc::S_IFCHR, 0)
                        .map_err(|err| Error::entry(&e.path, "create whiteout (char 0:0)", err))?;
                }
                if self.opts.defer_lowers && self.opts.parents.is_none() {
                    self.deferred_whiteouts
                        .push([parent, &[name]].concat().join(&b'/'));
                }
                return Ok(());
            }
            Marker::Plain => {}
        }
        let dir = self.parent(&e.path, parent)?;
        let name = sys::cstr(base).map_err(|err| Error::entry(&e.path, "name", err))?;
        if self.opts.wh {
            // The last entry for a path wins: a whiteout of it earlier in this layer goes.
            let wh = sys::cstr(&whiteout::wh_name(base))
                .map_err(|err| Error::entry(&e.path, "name", err))?;
            match sys::unlinkat(dir.as_fd(), &wh, 0) {
                Err(err) if err.raw_os_error() != Some(libc::ENOENT) => {
                    return Err(Error::entry(&e.path, "remove whiteout", err));
                }
                _ => {}
            }
        }
        for (attr, _) in &e.xattrs {
            if whiteout::is_overlay_xattr(attr) {
                return Err(Error::refused(
                    &e.path,
                    format!(
                        "overlay xattr {} is not allowed in a layer",
                        String::from_utf8_lossy(attr)
                    ),
                ));
            }
        }
        let dir = dir.as_fd();
        match e.kind {
            Kind::Dir => {
                match sys::mkdirat(dir, &name, 0o700) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                        let st = sys::lstatat(dir, &name)
                            .map_err(|err| Error::entry(&e.path, "stat", err))?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                            self.remove_existing(&e.path, dir, &name)?;
                            sys::mkdirat(dir, &name, 0o700)
                                .map_err(|err| Error::entry(&e.path, "mkdir", err))?;
                        }
                    }
                    Err(err) => return Err(Error::entry(&e.path, "mkdir", err)),
                }
                let fd = sys::openat(
                    dir,
                    &name,
                    libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(|err| Error::entry(&e.path, "open dir", err))?;
                if !self.implied.is_empty() {
                    self.implied.remove(&join(&comps));
                }
                self.dir_meta(e, fd.as_fd(), join(&comps))
            }
            Kind::File => {
                let fd = self.create(&e.path, dir, &name, |d, n| {
                    sys::openat(
                        d,
                        n,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                        0o600,
                    )
                })?;
                let mut file = File::from(fd);
                self.write_data(e, tar, &mut file)?;
                self.owner_mode(e, file.as_fd(), c"")?;
                self.xattrs(e, file.as_fd(), c"")?;
                sys::lutimesat(file.as_fd(), c"", e.mtime, e.mtime_nsec)
                    .map_err(|err| Error::entry(&e.path, "set times", err))
            }
            Kind::Symlink => {
                let target = sys::cstr(&e.link)
                    .map_err(|_| Error::refused(&e.path, "symlink target contains a NUL byte"))?;
                if e.link.is_empty() {
                    return Err(Error::refused(&e.path, "symlink with an empty target"));
                }
                self.create(&e.path, dir, &name, |d, n| sys::symlinkat(&target, d, n))?;
                self.chown(e, dir, &name)?;
                self.xattrs(e, dir, &name)?;
                sys::lutimesat(dir, &name, e.mtime, e.mtime_nsec)
                    .map_err(|err| Error::entry(&e.path, "set times", err))
            }
            Kind::HardLink => self.hardlink(e, dir, &name),
            Kind::Char | Kind::Block | Kind::Fifo => {
                let (fmt, what) = match e.kind {
                    Kind::Char => (libc::S_IFCHR, "character device"),
                    Kind::Block => (libc::S_IFBLK, "block device"),
                    _ => (libc::S_IFIFO, "fifo"),
                };
                if e.kind == Kind::Char && e.dev_major == 0 && e.dev_minor == 0 {
                    return Err(Error::refused(
                        &e.path,
                        "char device 0:0 is overlay's whiteout; a layer deletes with .wh. entries",
                    ));
                }
                if self.opts.rootless && e.kind != Kind::Fifo {
                    self.warn(format!(
                        "{}: {what} skipped in rootless mode",
                        String::from_utf8_lossy(&e.path)
                    ));
                    return Ok(());
                }
                let dev = sys::makedev(e.dev_major, e.dev_minor);
                self.create(&e.path, dir, &name, |d, n| {
                    sys::mknodat(d, n, fmt | (e.mode & 0o777), dev)
                })?;
                self.chown(e, dir, &name)?;
                sys::fchmodat(dir, &name, e.mode)
                    .map_err(|err| Error::entry(&e.path, "chmod", err))?;
                self.xattrs(e, dir, &name)?;
                sys::lutimesat(dir, &name, e.mtime, e.mtime_nsec)
                    .map_err(|err| Error::entry(&e.path, "set times", err))
            }
        }
    }

    /// Creates `name` with `make`, replacing whatever is there (a whiteout or an earlier entry of
    /// this layer).
    fn create<T>(
        &mut self,
        entry: &[u8],
        dir: BorrowedFd<'_>,
        name: &CStr,
        make: impl Fn(BorrowedFd<'_>, &CStr) -> io::Result<T>,
    ) -> Result<T> {
        match make(dir, name) {
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
                self.remove_existing(entry, dir, name)?;
                make(dir, name).map_err(|err| Error::entry(entry, "create", err))
            }
            r => r.map_err(|err| Error::entry(entry, "create", err)),
        }
    }

    fn hardlink(&mut self, e: &Entry, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        let tcomps = components(&e.link).map_err(|err| match err {
            Error::Refused { reason, .. } => {
                Error::refused(&e.path, format!("hardlink target {}", reason))
            }
            other => other,
        })?;
        let Some((&tbase, tparent)) = tcomps.split_last() else {
            return Err(Error::refused(&e.path, "hardlink to the layer root"));
        };
        if whiteout::classify(tbase) != Marker::Plain {
            return Err(Error::refused(
                &e.path,
                "hardlink to a whiteout or opaque marker",
            ));
        }
        let not_in_layer = || {
            Error::refused(
                &e.path,
                format!(
                    "hardlink target {:?} is not in this layer",
                    String::from_utf8_lossy(&e.link)
                ),
            )
        };
        let tdir: Rc<OwnedFd> = if tparent.is_empty() {
            self.root.clone()
        } else {
            let p = sys::cstr(&join(tparent)).map_err(|err| Error::entry(&e.path, "name", err))?;
            match sys::open_beneath(self.root.as_fd(), &p, libc::O_DIRECTORY | libc::O_RDONLY, 0) {
                Ok(fd) => Rc::new(fd),
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Err(not_in_layer()),
                Err(err) => return Err(self.resolve_error(&e.path, err)),
            }
        };
        let tname = sys::cstr(tbase).map_err(|err| Error::entry(&e.path, "name", err))?;
        let st = match sys::lstatat(tdir.as_fd(), &tname) {
            Ok(st) => st,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Err(not_in_layer()),
            Err(err) => return Err(Error::entry(&e.path, "stat hardlink target", err)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(Error::refused(&e.path, "hardlink to a directory"));
        }
        if whiteout::is_whiteout_stat(&st) {
            return Err(Error::refused(&e.path, "hardlink to a whiteout"));
        }
        if let Ok(cur) = sys::lstatat(dir, name) {
            if cur.st_ino == st.st_ino && cur.st_dev == st.st_dev {
                return Ok(());
            }
        }
        self.create(&e.path, dir, name, |d, n| {
            sys::linkat(tdir.as_fd(), &tname, d, n)
        })
    }

    fn write_data<R: Read>(
        &mut self,
        e: &Entry,
        tar: &mut Reader<R>,
        file: &mut File,
    ) -> Result<()> {
        let read_err = |err: io::Error| Error::entry(&e.path, "read data", err);
        let write_err = |err: io::Error| Error::entry(&e.path, "write data", err);
        let mut data = tar.data();
        match &e.sparse {
            None => {
                let mut left = e.size;
                while left > 0 {
                    let k = left.min(self.buf.len() as u64) as usize;
                    let n = data.read(&mut self.buf[..k]).map_err(read_err)?;
                    if n == 0 {
                        return Err(read_err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    file.write_all(&self.buf[..n]).map_err(write_err)?;
                    left -= n as u64;
                }
            }
            Some(segs) => {
                for &(off, len) in segs {
                    let mut pos = off;
                    let mut left = len;
                    while left > 0 {
                        let k = left.min(self.buf.len() as u64) as usize;
                        data.read_exact(&mut self.buf[..k]).map_err(read_err)?;
                        file.write_all_at(&self.buf[..k], pos).map_err(write_err)?;
                        pos += k as u64;
                        left -= k as u64;
                    }
                }
                file.set_len(e.size).map_err(write_err)?;
                file.seek(SeekFrom::Start(0)).map_err(write_err)?;
            }
        }
        Ok(())
    }

    fn chown(&mut self, e: &Entry, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        match sys::lchownat(dir, name, e.uid, e.gid) {
            Ok(()) => Ok(()),
            Err(err)
                if self.opts.rootless
                    && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EPERM)) =>
            {
                self.warn(format!(
                    "{}: owner {}:{} not mapped, kept as is",
                    String::from_utf8_lossy(&e.path),
                    e.uid,
                    e.gid
                ));
                Ok(())
            }
            Err(err) => Err(Error::entry(&e.path, "chown", err)),
        }
    }

    fn owner_mode(&mut self, e: &Entry, fd: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        self.chown(e, fd, name)?;
        // After chown, which clears setuid and setgid.
        sys::fchmod(fd, e.mode).map_err(|err| Error::entry(&e.path, "chmod", err))
    }

    fn xattrs(&mut self, e: &Entry, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        for (attr, value) in &e.xattrs {
            let cattr = sys::cstr(attr)
                .map_err(|_| Error::refused(&e.path, "xattr name contains a NUL byte"))?;
            let r = if name.is_empty() {
                sys::fsetxattr(dir, &cattr, value)
            } else {
                sys::lsetxattr(dir, name, &cattr, value)
            };
            match r {
                Ok(()) => {}
                Err(err)
                    if err.raw_os_error() == Some(libc::ENOTSUP)
                        || (self.opts.rootless && err.raw_os_error() == Some(libc::EPERM)) =>
                {
                    self.warn(format!(
                        "{}: xattr {} not supported here, skipped",
                        String::from_utf8_lossy(&e.path),
                        String::from_utf8_lossy(attr)
                    ));
                }
                Err(err) => return Err(Error::entry(&e.path, "set xattr", err)),
            }
        }
        Ok(())
    }

    fn dir_meta(&mut self, e: &Entry, fd: BorrowedFd<'_>, rel: Vec<u8>) -> Result<()> {
        self.owner_mode(e, fd, c"")?;
        self.xattrs(e, fd, c"")?;
        self.dirs.push((rel, e.mtime, e.mtime_nsec));
        Ok(())
    }

    fn resolve_error(&self, entry: &[u8], err: io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::ELOOP) => Error::refused(entry, "path goes through a symlink"),
            Some(libc::EXDEV) => Error::refused(entry, "path escapes the target"),
            Some(libc::ENOTDIR) => Error::refused(entry, "a parent of the path is not a directory"),
            _ => Error::entry(entry, "resolve parent", err),
        }
    }

    /// Opens the parent directory `comps` below the root, creating missing directories the tar
    /// implies (with metadata from the lowers when they have them).
    fn parent(&mut self, entry: &[u8], comps: &[&[u8]]) -> Result<Rc<OwnedFd>> {
        let key = join(comps);
        if let Some((k, fd)) = &self.cached {
            if *k == key {
                return Ok(fd.clone());
            }
        }
        let fd = if comps.is_empty() {
            self.root.clone()
        } else {
            let p = sys::cstr(&key).map_err(|err| Error::entry(entry, "name", err))?;
            match sys::open_beneath(self.root.as_fd(), &p, libc::O_DIRECTORY | libc::O_RDONLY, 0) {
                Ok(fd) => Rc::new(fd),
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    self.make_parents(entry, comps)?
                }
                Err(err) => return Err(self.resolve_error(entry, err)),
            }
        };
        self.cached = Some((key, fd.clone()));
        Ok(fd)
    }

    fn make_parents(&mut self, entry: &[u8], comps: &[&[u8]]) -> Result<Rc<OwnedFd>> {
        let mut cur = self.root.clone();
        for (i, c) in comps.iter().enumerate() {
            let name = sys::cstr(c).map_err(|err| Error::entry(entry, "name", err))?;
            let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW;
            let next = match sys::openat(cur.as_fd(), &name, flags, 0) {
                Ok(fd) => fd,
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    let (mode, uid, gid) =
                        self.lower_dir_meta(&comps[..=i]).unwrap_or((0o755, 0, 0));
                    if self.opts.defer_lowers && self.opts.parents.is_none() {
                        self.implied.insert(join(&comps[..=i]));
                    }
                    sys::mkdirat(cur.as_fd(), &name, 0o700)
                        .map_err(|err| Error::entry(entry, "create parent dir", err))?;
                    let fd = sys::openat(cur.as_fd(), &name, flags, 0)
                        .map_err(|err| Error::entry(entry, "open parent dir", err))?;
                    if !(self.opts.rootless && (uid, gid) != (0, 0)) {
                        sys::lchownat(fd.as_fd(), c"", uid, gid)
                            .map_err(|err| Error::entry(entry, "chown parent dir", err))?;
                    }
                    sys::fchmod(fd.as_fd(), mode)
                        .map_err(|err| Error::entry(entry, "chmod parent dir", err))?;
                    fd
                }
                Err(err) if matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(self.resolve_error(entry, err));
                }
                Err(err) => return Err(Error::entry(entry, "open parent dir", err)),
            };
            cur = Rc::new(next);
        }
        Ok(cur)
    }

    /// False only when the lowers are known and none has `comps`.
    fn in_lowers(&mut self, entry: &[u8], comps: &[&[u8]]) -> Result<bool> {
        let Some(parents) = &self.opts.parents else {
            return Ok(true);
        };
        if parents.is_empty() {
            return Ok(false);
        }
        let view = self
            .lowers
            .get_or_insert_with(|| crate::diff::LowerView::new(parents.clone()));
        match view.lookup(&join(comps)) {
            Ok(found) => Ok(found.is_some()),
            Err(e) => Err(Error::refused(
                entry,
                format!("looking it up in the lowers: {e}"),
            )),
        }
    }

    fn lower_dir_meta(&self, comps: &[&[u8]]) -> Option<(u32, u32, u32)> {
        lower_dir_meta(self.opts.parents.as_deref().unwrap_or(&[]), &join(comps))
    }

    /// Removes whatever `name` is (a directory recursively), without following symlinks.
    /// An empty file `name` in `dir` (a `.wh.` whiteout or opaque marker), made or kept.
    fn empty_file(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        sys::openat(
            dir,
            name,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o644,
        )
        .map(drop)
    }

    fn remove_existing(&mut self, entry: &[u8], dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        match sys::unlinkat(dir, name, 0) {
            Ok(()) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(err) if matches!(err.raw_os_error(), Some(libc::EISDIR | libc::EPERM)) => {
                // A directory: any cached fd may point into it.
                self.cached = None;
                remove_tree(dir, name)
                    .map_err(|err| Error::entry(entry, "remove existing directory", err))
            }
            Err(err) => Err(Error::entry(entry, "remove existing", err)),
        }
    }

    fn finish(&mut self) -> Result<()> {
        for (rel, sec, nsec) in self.dirs.iter().rev() {
            let fd = if rel.is_empty() {
                Ok(self.root.clone())
            } else {
                let p = sys::cstr(rel).map_err(|err| Error::entry(rel, "name", err))?;
                match sys::open_beneath(
                    self.root.as_fd(),
                    &p,
                    libc::O_DIRECTORY | libc::O_RDONLY,
                    0,
                ) {
                    Err(err)
                        if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                    {
                        continue;
                    }
                    r => r.map(Rc::new),
                }
            }
            .map_err(|err| Error::entry(rel, "open dir", err))?;
            sys::lutimesat(fd.as_fd(), c"", *sec, *nsec)
                .map_err(|err| Error::entry(rel, "set dir times", err))?;
        }
        Ok(())
    }
}

/// Removes the tree `name` below `dir` without following symlinks.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let fd = sys::openat(
        dir,
        name,
        libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
        0,
    )?;
    for (child, kind) in sys::read_dir(fd.as_fd())? {
        let c = sys::cstr(&child)?;
        if kind == libc::DT_DIR {
            remove_tree(fd.as_fd(), &c)?;
        } else {
            match sys::unlinkat(fd.as_fd(), &c, 0) {
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => remove_tree(fd.as_fd(), &c)?,
                r => r?,
            }
        }
    }
    sys::unlinkat(dir, name, libc::AT_REMOVEDIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_validated() {
        assert_eq!(components(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(components(b"").unwrap().is_empty());
        assert!(components(b"/etc").is_err());
        assert!(components(b"a/../b").is_err());
        assert!(components(b"a\0b").is_err());
        assert!(components(&vec![b'a'; 5000]).is_err());
    }
}
