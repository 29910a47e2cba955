//! Shared test helpers: prerequisites, tree snapshots, tar building.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest as _;
use strata_overlay::archive::{Entry, Kind, Writer};

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Prereq {
    /// Running as root (mounts, chown, devices, trusted xattrs).
    Root,
    /// A command on PATH.
    Command(&'static str),
}

/// Panics naming what is missing: a missing prerequisite is a failure, never a silent skip.
pub fn require(p: Prereq) {
    match p {
        Prereq::Root => {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test needs root (mounts, chown, mknod): run the suite as root"
            );
        }
        Prereq::Command(c) => {
            let ok = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {c}"))
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                ok,
                "this test needs `{c}` on PATH (scripts/test-all.sh installs it)"
            );
        }
    }
}

/// What a test compares of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: Option<String>,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The first path (in sort order) of this inode's hard-link group within the tree.
    pub group: Option<String>,
}

/// The tree below `root` as path -> node (root itself excluded), never following symlinks.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    for paths in inodes.values() {
        if paths.len() > 1 {
            let first = paths.iter().min().unwrap().clone();
            for p in paths {
                out.get_mut(p).unwrap().group = Some(first.clone());
            }
        }
    }
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, Node>,
    inodes: &mut HashMap<(u64, u64), Vec<String>>,
) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("lstat {} (listed by readdir): {e}", p.display()));
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let content = ft.is_file().then(|| {
            let data = std::fs::read(&p).unwrap();
            format!("{}:{:x}", data.len(), sha2::Sha256::digest(&data))
        });
        let link = ft.is_symlink().then(|| {
            std::fs::read_link(&p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        });
        let mut xattrs: Vec<(String, Vec<u8>)> = xattr_list(&p)
            .into_iter()
            .filter(|n| !n.starts_with("trusted.overlay.") && !n.starts_with("user.overlay."))
            .map(|n| {
                let v = xattr_get(&p, &n);
                (n, v)
            })
            .collect();
        xattrs.sort();
        if !ft.is_dir() {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                content,
                link,
                rdev: m.rdev(),
                xattrs,
                group: None,
            },
        );
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// `llistxattr` through the `getfattr`-free route: the `attr` crate is not a dependency, so use
/// the syscall via nix-free libc.
pub fn xattr_list(p: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is valid for writes of its length; `c` is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// `lgetxattr`.
pub fn xattr_get(p: &Path, name: &str) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is valid for writes of its length; the strings are NUL-terminated.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Vec::new();
    }
    buf.truncate(r as usize);
    buf
}

/// `lsetxattr`.
pub fn xattr_set(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: `value` is valid for reads of its length; the strings are NUL-terminated.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A plain tar built entry by entry with the crate's writer.
pub struct Tar {
    w: Writer<Vec<u8>>,
}

impl Tar {
    pub fn new() -> Self {
        Tar {
            w: Writer::new(Vec::new()),
        }
    }
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut e = Entry::new(path, Kind::Dir);
        e.mode = mode;
        self.w.append(&e, &mut std::io::empty()).unwrap();
        self
    }
    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        let mut e = Entry::new(path, Kind::File);
        e.mode = 0o644;
        e.size = data.len() as u64;
        self.w.append(&e, &mut &data[..]).unwrap();
        self
    }
    pub fn entry(mut self, e: Entry, data: &[u8]) -> Self {
        self.w.append(&e, &mut &data[..]).unwrap();
        self
    }
    pub fn link(mut self, kind: Kind, path: &str, target: &str) -> Self {
        let mut e = Entry::new(path, kind);
        e.mode = 0o777;
        e.link = target.into();
        self.w.append(&e, &mut std::io::empty()).unwrap();
        self
    }
    pub fn bytes(self) -> Vec<u8> {
        self.w.finish().unwrap()
    }
}

/// A scratch dir on the real disk (not tmpfs, which lacks some xattr support).
pub fn scratch() -> tempfile::TempDir {
    let base =
        PathBuf::from(std::env::var("STRATA_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("strata-it-")
        .tempdir_in(base)
        .unwrap()
}

/// Everything below `dir` as a sorted list of relative paths (to check nothing else appeared).
pub fn listing(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

/// Lists a directory's parent to check nothing appeared beside the target.
pub fn siblings(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A mount that is detached if the test panics or returns early; [`Mounted::unmount`] is the
/// normal, checked way out.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// Unmounts (not lazily: the caller needs the upper quiet afterwards).
    pub fn unmount(self) {
        strata_overlay::mount::unmount(&self.0, false).unwrap();
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = strata_overlay::mount::unmount(&self.0, true);
    }
}
