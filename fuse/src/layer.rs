//! The union's model of the on-disk layers: lookup through a stack of layer directories, top
//! first, with overlayfs' rules, accepting both encodings of deletions and opaque directories
//! (so an upper made by kernel overlay, a layer unpacked by Strata, and a tree in the OCI
//! `.wh.` form all read the same):
//!
//! - a name is deleted in a layer by a whiteout: a character device 0:0 of that name, or a
//!   file `.wh.NAME` beside it; it hides the name in every layer below;
//! - a directory is opaque when it has the xattr `trusted.overlay.opaque` or
//!   `user.overlay.opaque` = `y`, or holds `.wh..wh..opq`; it hides the directories of the same
//!   path below it;
//! - a non-directory hides everything below it at its path; a directory merges with the
//!   directories of the same path below it (until an opaque one or a non-directory);
//! - the marker names themselves (`.wh.*`) are never part of the merged view.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, fstatat};
use strata_overlay::whiteout::{OPAQUE_MARKER, OPAQUE_VALUE, WHITEOUT_PREFIX, XattrNs};

/// Whether a layer is the writable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// The upper layer: copy-ups, new files and whiteouts go here.
    Upper,
    /// A read-only lower layer.
    Lower,
}

/// One layer directory.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Its root.
    pub root: PathBuf,
    /// Upper or lower.
    pub kind: LayerKind,
}

/// The layers of a union, top first (the upper, if any, is first).
#[derive(Debug, Clone)]
pub struct Stack {
    layers: Vec<Layer>,
    links: LinkIndex,
    /// Whether the upper may hold OCI markers (`.wh.NAME`, `.wh..wh..opq`): true until
    /// [`Stack::scan_upper_markers`] finds none, and again once the union writes one. Without
    /// them, a name missing from the upper needs no second look there.
    upper_markers: Arc<AtomicBool>,
}

/// At most this many upper entries are looked through for OCI markers; a bigger upper is
/// taken to have them.
const MARKER_SCAN_CAP: usize = 100_000;

/// Per lower layer, built on first need: every file with more than one link, by
/// `(st_dev, st_ino)`, with all its names in that layer. Lowers never change under a mount.
#[derive(Clone, Default)]
struct LinkIndex(Arc<Mutex<HashMap<usize, Arc<LinkNames>>>>);

type LinkNames = HashMap<(u64, u64), Vec<PathBuf>>;

impl std::fmt::Debug for LinkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkIndex")
    }
}

fn index_links(root: &Path) -> LinkNames {
    use std::os::unix::fs::MetadataExt;
    let mut names = LinkNames::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            let child = rel.join(e.file_name());
            if m.is_dir() {
                todo.push(child);
            } else if m.nlink() > 1 {
                names.entry((m.dev(), m.ino())).or_default().push(child);
            }
        }
    }
    names
}

/// What a path is in the merged view.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A non-directory, taken from layer `layer`.
    File {
        /// Index of the layer holding it.
        layer: usize,
        /// Its `lstat` there.
        stat: FileStat,
    },
    /// A directory: the layers (top first) whose directories at this path merge, and the
    /// `lstat` of the topmost, whose attributes the merged directory shows.
    Dir {
        /// Indexes of the layers that contribute, top first.
        layers: Vec<usize>,
        /// `lstat` of the topmost one.
        stat: FileStat,
    },
}

impl Resolved {
    /// The attributes the merged view shows.
    pub fn stat(&self) -> &FileStat {
        match self {
            Resolved::File { stat, .. } | Resolved::Dir { stat, .. } => stat,
        }
    }

    /// The topmost layer holding it.
    pub fn layer(&self) -> usize {
        match self {
            Resolved::File { layer, .. } => *layer,
            Resolved::Dir { layers, .. } => layers[0],
        }
    }
}

/// One name of a merged directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// The layer it comes from (the topmost that has it).
    pub layer: usize,
    /// Its file type bits (`S_IFMT` part of `st_mode`).
    kind: u32,
    /// The backing file: `(st_dev, st_ino)`.
    pub file: (u64, u64),
    /// Its `lstat`, when the listing needed it (see [`Stack::read_dir`]).
    stat: Option<FileStat>,
}

impl DirEntry {
    /// Its file type bits (`S_IFMT` part of `st_mode`).
    pub fn kind(&self) -> u32 {
        self.kind
    }
}

/// A merged listing (see [`Stack::read_dir`]): its entries, and the layers' directories kept
/// open, so that an entry's attributes are read beside them when asked for.
pub struct MergedDir {
    /// Every name of the merged directory once, in the layers' order.
    pub entries: Vec<(OsString, DirEntry)>,
    /// The open directory of each contributing layer, by layer index (a `Dir` is not `Sync`;
    /// its stream is not used again, only its descriptor).
    dirs: Vec<(usize, Mutex<nix::dir::Dir>)>,
}

impl std::fmt::Debug for MergedDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedDir")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl MergedDir {
    /// True when the merged directory has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `lstat` of entry `e` named `name` (None if it went away since it was listed).
    pub fn stat(&self, name: &OsStr, e: &DirEntry) -> Option<FileStat> {
        if let Some(st) = e.stat {
            return Some(st);
        }
        let (_, dir) = self.dirs.iter().find(|(i, _)| *i == e.layer)?;
        let dir = dir.lock().unwrap_or_else(|p| p.into_inner());
        fstatat(&*dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()
    }
}

fn lstat(path: &Path) -> Option<FileStat> {
    fstatat(nix::fcntl::AT_FDCWD, path, AtFlags::AT_SYMLINK_NOFOLLOW).ok()
}

/// A char 0:0: a whiteout in the kernel's form.
pub(crate) fn is_whiteout(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

fn kind(st: &FileStat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// True when the directory at `dir` is opaque (either form).
pub fn is_opaque(dir: &Path) -> bool {
    is_opaque_in(dir, true)
}

/// [`is_opaque`], looking for the OCI form's marker only if `markers`.
fn is_opaque_in(dir: &Path, markers: bool) -> bool {
    for ns in XattrNs::ALL {
        let name = OsStr::from_bytes(ns.opaque().to_bytes());
        if let Ok(v) = crate::sys::lgetxattr(dir, name) {
            if v == OPAQUE_VALUE {
                return true;
            }
        }
    }
    markers && lstat(&dir.join(OsStr::from_bytes(OPAQUE_MARKER))).is_some()
}

/// `.wh.NAME`: the OCI form of a whiteout for `name`.
pub(crate) fn whiteout_name(name: &OsStr) -> OsString {
    let mut w = OsString::from(OsStr::from_bytes(WHITEOUT_PREFIX));
    w.push(name);
    w
}

/// True when `name` is one of the marker names that never show in the merged view.
pub fn is_marker(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WHITEOUT_PREFIX)
}

impl Stack {
    /// A stack of `layers`, top first.
    pub fn new(layers: Vec<Layer>) -> Stack {
        Stack {
            layers,
            links: LinkIndex::default(),
            upper_markers: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Looks through the upper (up to 100,000 entries) for OCI markers; when it
    /// holds none, lookups stop looking for them there (see [`Stack::upper_markers`]).
    pub fn scan_upper_markers(&self) {
        self.scan_upper_markers_within(MARKER_SCAN_CAP)
    }

    fn scan_upper_markers_within(&self, cap: usize) {
        let Some(up) = self.upper() else { return };
        let mut seen = 0usize;
        let mut todo = vec![self.layers[up].root.clone()];
        while let Some(dir) = todo.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                return;
            };
            for e in rd {
                let Ok(e) = e else { return };
                seen += 1;
                if seen > cap || is_marker(&e.file_name()) {
                    return;
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
        self.upper_markers.store(false, Ordering::SeqCst);
    }

    /// The flag the upper's writer raises before it writes an OCI marker.
    pub fn upper_markers(&self) -> Arc<AtomicBool> {
        self.upper_markers.clone()
    }

    /// Whether layer `i` may hold OCI markers.
    fn markers_in(&self, i: usize) -> bool {
        i != 0
            || self.layers[0].kind != LayerKind::Upper
            || self.upper_markers.load(Ordering::SeqCst)
    }

    /// Every name in lower layer `layer` of the file `(st_dev, st_ino)` (hard links).
    pub fn link_names(&self, layer: usize, file: (u64, u64)) -> Vec<PathBuf> {
        let index = {
            let mut all = self.links.0.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(layer)
                .or_insert_with(|| Arc::new(index_links(&self.layers[layer].root)))
                .clone()
        };
        index.get(&file).cloned().unwrap_or_default()
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The upper layer's index (0), if the union is writable.
    pub fn upper(&self) -> Option<usize> {
        (self.layers.first()?.kind == LayerKind::Upper).then_some(0)
    }

    /// The real path of `rel` in layer `i`.
    pub fn path(&self, i: usize, rel: &Path) -> PathBuf {
        self.layers[i].root.join(rel)
    }

    /// The root directory: every layer's root merges (until an opaque one).
    pub fn root(&self) -> Option<Resolved> {
        let mut layers = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if lstat(&l.root).is_some_and(|s| kind(&s) == libc::S_IFDIR) {
                layers.push(i);
                if is_opaque(&l.root) {
                    break;
                }
            }
        }
        let stat = lstat(&self.layers[*layers.first()?].root)?;
        Some(Resolved::Dir { layers, stat })
    }

    /// Looks up `name` in the merged directory `parent` (whose path is `rel`), as overlayfs
    /// does; `None` when it does not exist in the merged view.
    pub fn lookup(&self, parent: &[usize], rel: &Path, name: &OsStr) -> Option<Resolved> {
        if is_marker(name) {
            return None;
        }
        let child = rel.join(name);
        let mut dirs: Vec<usize> = Vec::new();
        let mut top: Option<FileStat> = None;
        for &i in parent {
            let here = self.path(i, &child);
            match lstat(&here) {
                Some(st) if is_whiteout(&st) => break,
                Some(st) if kind(&st) == libc::S_IFDIR => {
                    dirs.push(i);
                    top.get_or_insert(st);
                    if is_opaque_in(&here, self.markers_in(i)) {
                        break;
                    }
                }
                Some(st) => {
                    // A non-directory: the answer if nothing above had a directory here,
                    // else it is hidden by that directory.
                    if dirs.is_empty() {
                        return Some(Resolved::File { layer: i, stat: st });
                    }
                    break;
                }
                None => {
                    if self.markers_in(i)
                        && lstat(&self.path(i, &rel.join(whiteout_name(name)))).is_some()
                    {
                        break;
                    }
                }
            }
        }
        top.map(|stat| Resolved::Dir { layers: dirs, stat })
    }

    /// Resolves a whole relative path from the root.
    pub fn resolve(&self, rel: &Path) -> Option<Resolved> {
        let mut cur = self.root()?;
        let mut at = PathBuf::new();
        for comp in rel.components() {
            let std::path::Component::Normal(name) = comp else {
                continue;
            };
            let Resolved::Dir { layers, .. } = &cur else {
                return None;
            };
            let next = self.lookup(layers, &at, name)?;
            at.push(name);
            cur = next;
        }
        Some(cur)
    }

    /// The merged listing of the directory `rel` made of `layers` (top first): every name of
    /// every contributing layer once, from the topmost layer that has it, without whited-out
    /// names or markers; in the layers' own order (upper names first), as kernel overlay lists.
    /// A directory of one layer (most of a lower tree) needs no merging: no name sets.
    ///
    /// Names and types come from the directory itself (`getdents`), so a listing costs no
    /// `lstat` per entry: only entries the directory entry cannot tell enough about are
    /// stat'ed (a character device may be a whiteout; a directory may be a mount point, whose
    /// number is not the one `getdents` gives; a filesystem may not give types), and one more
    /// per layer, to check that `getdents`' numbers are the files' own. Every other entry's
    /// attributes are read when asked for ([`MergedDir::stat`]).
    pub fn read_dir(&self, layers: &[usize], rel: &Path) -> std::io::Result<MergedDir> {
        use nix::dir::Type;
        let mut out = MergedDir {
            entries: Vec::new(),
            dirs: Vec::with_capacity(layers.len()),
        };
        let merging = layers.len() > 1;
        let mut seen: std::collections::HashSet<OsString> = Default::default();
        let mut hidden: std::collections::HashSet<OsString> = Default::default();
        for (k, &i) in layers.iter().enumerate() {
            let below = k + 1 < layers.len();
            let path = self.path(i, rel);
            let mut dir = match nix::dir::Dir::open(
                &path,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                Ok(d) => d,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let dev = nix::sys::stat::fstat(&dir)?.st_dev;
            let names: Vec<(std::ffi::CString, u64, Option<Type>)> = dir
                .iter()
                .filter_map(|e| match e {
                    Ok(e) if !matches!(e.file_name().to_bytes(), b"." | b"..") => {
                        Some(Ok((e.file_name().to_owned(), e.ino(), e.file_type())))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(std::io::Error::from(e))),
                })
                .collect::<std::io::Result<_>>()?;
            let mut whiteouts = Vec::new();
            let mut trusted = None;
            for (cname, ino, ty) in names {
                let bytes = cname.to_bytes();
                if let Some(rest) = bytes.strip_prefix(WHITEOUT_PREFIX) {
                    if below && bytes != OPAQUE_MARKER {
                        whiteouts.push(OsStr::from_bytes(rest).to_os_string());
                    }
                    continue;
                }
                if merging {
                    let name = OsStr::from_bytes(bytes);
                    if seen.contains(name) || hidden.contains(name) {
                        continue;
                    }
                }
                let typed = match ty {
                    Some(Type::File) => Some(libc::S_IFREG),
                    Some(Type::Symlink) => Some(libc::S_IFLNK),
                    Some(Type::Fifo) => Some(libc::S_IFIFO),
                    Some(Type::Socket) => Some(libc::S_IFSOCK),
                    Some(Type::BlockDevice) => Some(libc::S_IFBLK),
                    Some(Type::CharacterDevice | Type::Directory) | None => None,
                };
                let entry = match typed {
                    Some(kind) if trusted == Some(true) => DirEntry {
                        layer: i,
                        kind,
                        file: (dev, ino),
                        stat: None,
                    },
                    _ => {
                        let Ok(st) = fstatat(&dir, cname.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                        else {
                            continue;
                        };
                        // The first typed entry shows whether this directory's numbers are its
                        // files' (an overlayfs over several filesystems, for one, shows other
                        // `st_dev`s): if not, every entry is stat'ed.
                        if typed.is_some() && trusted.is_none() {
                            trusted = Some((st.st_dev, st.st_ino) == (dev, ino));
                        }
                        if is_whiteout(&st) {
                            if below {
                                hidden.insert(OsString::from_vec(cname.into_bytes()));
                            }
                            continue;
                        }
                        DirEntry {
                            layer: i,
                            kind: kind(&st),
                            file: (st.st_dev, st.st_ino),
                            stat: Some(st),
                        }
                    }
                };
                let name = OsString::from_vec(cname.into_bytes());
                if merging {
                    seen.insert(name.clone());
                }
                out.entries.push((name, entry));
            }
            out.dirs.push((i, Mutex::new(dir)));
            // `.wh.NAME` hides NAME below this layer (this layer's own NAME, if any, stays).
            hidden.extend(whiteouts);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(t: &Path, n: usize) -> Stack {
        let mut layers = vec![Layer {
            root: t.join("upper"),
            kind: LayerKind::Upper,
        }];
        std::fs::create_dir_all(t.join("upper")).unwrap();
        for i in 0..n {
            let p = t.join(format!("l{i}"));
            std::fs::create_dir_all(&p).unwrap();
            layers.push(Layer {
                root: p,
                kind: LayerKind::Lower,
            });
        }
        Stack::new(layers)
    }

    fn w(p: &Path, data: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    fn names(s: &Stack, rel: &str) -> Vec<String> {
        let Some(Resolved::Dir { layers, .. }) = s.resolve(Path::new(rel)) else {
            panic!("{rel} is not a directory");
        };
        let mut v: Vec<String> = s
            .read_dir(&layers, Path::new(rel))
            .unwrap()
            .entries
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn oci_markers_in_the_upper_are_looked_for_only_while_it_may_hold_them() {
        let t = tempfile::tempdir().unwrap();
        let (u, l0) = (t.path().join("upper"), t.path().join("l0"));
        w(&l0.join("d/x"), "x");
        w(&l0.join("d/y"), "y");
        w(&l0.join("o/z"), "z");
        std::fs::create_dir_all(u.join("o")).unwrap();
        // An upper written in the OCI form: the scan finds a marker, so both kinds count.
        w(&u.join("d/.wh.x"), "");
        w(&u.join("o/.wh..wh..opq"), "");
        let s = stack(t.path(), 1);
        s.scan_upper_markers();
        assert!(s.upper_markers().load(Ordering::SeqCst));
        assert!(s.resolve(Path::new("d/x")).is_none(), "whited out");
        assert!(
            s.resolve(Path::new("o/z")).is_none(),
            "behind an opaque dir"
        );
        // An upper without markers: lookups stop asking for them there...
        std::fs::remove_dir_all(&u).unwrap();
        std::fs::create_dir_all(u.join("d")).unwrap();
        let s = stack(t.path(), 1);
        s.scan_upper_markers();
        assert!(!s.upper_markers().load(Ordering::SeqCst));
        assert!(s.resolve(Path::new("d/y")).is_some());
        // ...until the union raises the flag before writing one (the rootless fallback).
        s.upper_markers().store(true, Ordering::SeqCst);
        w(&u.join("d/.wh.y"), "");
        assert!(s.resolve(Path::new("d/y")).is_none());
        // Past the scan's cap, an upper is taken to have markers.
        std::fs::remove_dir_all(&u).unwrap();
        std::fs::create_dir_all(&u).unwrap();
        let s = stack(t.path(), 1);
        for i in 0..=10 {
            std::fs::File::create(u.join(i.to_string())).unwrap();
        }
        s.scan_upper_markers_within(10);
        assert!(s.upper_markers().load(Ordering::SeqCst));
    }

    #[test]
    fn both_whiteout_forms_hide_and_markers_never_show() {
        let t = tempfile::tempdir().unwrap();
        let s = stack(t.path(), 2);
        let (u, l0, l1) = (
            t.path().join("upper"),
            t.path().join("l0"),
            t.path().join("l1"),
        );
        w(&l1.join("d/a"), "a1");
        w(&l1.join("d/b"), "b1");
        w(&l1.join("d/c"), "c1");
        w(&l0.join("d/a"), "a0");
        // OCI form in the middle layer deletes b; the upper overrides a.
        w(&l0.join("d/.wh.b"), "");
        w(&u.join("d/a"), "au");
        assert_eq!(names(&s, "d"), ["a", "c"]);
        match s.resolve(Path::new("d/a")).unwrap() {
            Resolved::File { layer, .. } => assert_eq!(layer, 0),
            r => panic!("{r:?}"),
        }
        assert!(s.resolve(Path::new("d/b")).is_none());
        assert!(
            s.resolve(Path::new("d/.wh.b")).is_none(),
            "markers are not names"
        );
        // Kernel form: a char 0:0 in the upper (needs root to mknod).
        if nix::unistd::geteuid().is_root() {
            nix::sys::stat::mknod(
                &u.join("d/c"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap();
            assert!(s.resolve(Path::new("d/c")).is_none());
            assert_eq!(names(&s, "d"), ["a"]);
        }
    }

    #[test]
    fn opaque_dirs_in_both_forms_and_files_over_dirs() {
        let t = tempfile::tempdir().unwrap();
        let s = stack(t.path(), 1);
        let (u, l0) = (t.path().join("upper"), t.path().join("l0"));
        w(&l0.join("x/old"), "");
        w(&l0.join("y/old"), "");
        w(&l0.join("z/deep/f"), "");
        w(&u.join("x/.wh..wh..opq"), "");
        w(&u.join("x/new"), "");
        std::fs::create_dir_all(u.join("y")).unwrap();
        xattr_set(&u.join("y"), "user.overlay.opaque", b"y");
        // A file over a lower directory hides the whole tree.
        w(&u.join("z"), "now a file");
        assert_eq!(names(&s, "x"), ["new"]);
        assert_eq!(names(&s, "y"), Vec::<String>::new());
        assert!(matches!(
            s.resolve(Path::new("z")),
            Some(Resolved::File { layer: 0, .. })
        ));
        assert!(s.resolve(Path::new("z/deep/f")).is_none());
        // Merged dirs list every layer's names once.
        w(&u.join("m/u"), "");
        w(&l0.join("m/l"), "");
        w(&l0.join("m/u"), "");
        assert_eq!(names(&s, "m"), ["l", "u"]);
        match s.resolve(Path::new("m")).unwrap() {
            Resolved::Dir { layers, .. } => assert_eq!(layers, [0, 1]),
            r => panic!("{r:?}"),
        }
        assert_eq!(names(&s, ""), ["m", "x", "y", "z"]);
    }

    fn xattr_set(p: &Path, name: &str, v: &[u8]) {
        crate::sys::lsetxattr(p, OsStr::new(name), v).unwrap();
    }
}
