//! POSIX behaviour of a writable FUSE union, one operation at a time: hard links across
//! copy-up, POSIX record locks between processes, shared writable mmap, fallocate, files over
//! 4 GiB, O_DIRECT, and the errors callers rely on.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use strata_fuse::layer::{Layer, LayerKind, Stack};

/// A FUSE union of one lower (filled by `fill`) under a fresh upper, unmounted on drop.
pub struct Union {
    _t: tempfile::TempDir,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub at: PathBuf,
    pub stats: strata_fuse::fs::Stats,
    session: Option<fuser::BackgroundSession>,
}

impl Union {
    pub fn new(fill: impl FnOnce(&Path)) -> Union {
        Self::with_cap(fill, strata_fuse::evict::DEFAULT_CAP)
    }

    /// [`Union::new`] keeping at most about `cap` nodes.
    pub fn with_cap(fill: impl FnOnce(&Path), cap: usize) -> Union {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the FUSE tests mount file systems: run them as root"
        );
        let t = scratch("strata-posix-");
        let d = |n: &str| made(t.path(), n);
        let (lower, upper, work, at) = (d("lower"), d("upper"), d("work"), d("m"));
        fill(&lower);
        let stack = Stack::new(vec![
            Layer {
                root: upper.clone(),
                kind: LayerKind::Upper,
            },
            Layer {
                root: lower.clone(),
                kind: LayerKind::Lower,
            },
        ]);
        let union = strata_fuse::Union::writable(stack, work).with_node_cap(cap);
        let stats = union.stats();
        let session = strata_fuse::fs::spawn(
            union,
            &at,
            &strata_fuse::fs::config("strata-posix", 2, false),
        )
        .unwrap();
        Union {
            _t: t,
            lower,
            upper,
            at,
            stats,
            session: Some(session),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.at.join(rel)
    }
}

impl Drop for Union {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            crate::end(s, &self.at);
        }
    }
}

/// A scratch directory under /var/tmp (a disk filesystem, as a store's; /tmp may be tmpfs).
fn scratch(prefix: &str) -> tempfile::TempDir {
    std::fs::create_dir_all("/var/tmp").unwrap();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The directory `name` in `dir`, made.
fn made(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir(&p).unwrap();
    p
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn hard_links_stay_one_file_after_copy_up() {
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        std::fs::write(l.join("a"), b"old").unwrap();
        std::fs::hard_link(l.join("a"), l.join("d/b")).unwrap();
        std::fs::write(l.join("single"), b"1").unwrap();
    });
    let (a, b) = (
        std::fs::metadata(u.p("a")).unwrap(),
        std::fs::metadata(u.p("d/b")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one file, two names");
    std::fs::write(u.p("a"), b"new").unwrap(); // copy-up on write
    assert_eq!(
        std::fs::read(u.p("d/b")).unwrap(),
        b"new",
        "the other name sees the write"
    );
    let (a2, b2) = (
        std::fs::metadata(u.p("a")).unwrap(),
        std::fs::metadata(u.p("d/b")).unwrap(),
    );
    assert_eq!(a2.ino(), a.ino(), "inode numbers are stable across copy-up");
    assert_eq!((b2.ino(), b2.nlink()), (a.ino(), 2));
    // In the upper, as a layer diff will see it: one inode, both names.
    let (ua, ub) = (
        std::fs::metadata(u.upper.join("a")).unwrap(),
        std::fs::metadata(u.upper.join("d/b")).unwrap(),
    );
    assert_eq!((ua.ino(), ua.nlink()), (ub.ino(), 2));
    assert_eq!(
        std::fs::read(u.lower.join("a")).unwrap(),
        b"old",
        "the lower is untouched"
    );
    // A new link through the mount joins the same file; unlinking the first name keeps it.
    std::fs::hard_link(u.p("d/b"), u.p("c")).unwrap();
    assert_eq!(std::fs::metadata(u.p("c")).unwrap().ino(), a.ino());
    std::fs::remove_file(u.p("a")).unwrap();
    let c = std::fs::metadata(u.p("c")).unwrap();
    assert_eq!((c.ino(), c.nlink()), (a.ino(), 2));
    std::fs::write(u.p("c"), b"via c").unwrap();
    assert_eq!(std::fs::read(u.p("d/b")).unwrap(), b"via c");
    assert!(!u.p("a").exists());
    // An unlinked file is still one copy-up apart from nothing else.
    std::fs::write(u.p("single"), b"2").unwrap();
    assert_eq!(
        std::fs::metadata(u.upper.join("single")).unwrap().nlink(),
        1
    );
}

#[test]
fn posix_locks_conflict_between_processes() {
    let u = Union::new(|l| std::fs::write(l.join("f"), b"data").unwrap());
    let path = u.p("f");
    // Another process holds a write lock on the file through the mount.
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (apt-get install python3)");
    let mut line = [0u8; 7];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"locked\n");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let lock = |kind| libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let busy = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&lock(libc::F_WRLCK)));
    assert!(
        matches!(
            busy,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES)
        ),
        "{busy:?}"
    );
    let mut probe = lock(libc::F_WRLCK);
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETLK(&mut probe)).unwrap();
    assert_eq!(probe.l_pid as u32, holder.id(), "F_GETLK names the holder");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&lock(libc::F_WRLCK))).unwrap();
}

#[test]
fn shared_writable_mmap_reaches_the_upper() {
    let u = Union::new(|l| std::fs::write(l.join("m"), vec![b'a'; 8192]).unwrap());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(u.p("m"))
        .unwrap();
    // SAFETY: the file is only changed through this map while it lives.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    map[0..5].copy_from_slice(b"hello");
    map[8191] = b'z';
    map.flush().unwrap();
    drop(map);
    drop(f);
    let up = std::fs::read(u.upper.join("m")).unwrap();
    assert_eq!((&up[..5], up[8191], up.len()), (&b"hello"[..], b'z', 8192));
    assert_eq!(std::fs::read(u.lower.join("m")).unwrap()[0], b'a');
}

#[test]
fn fallocate_large_files_and_o_direct() {
    let u = Union::new(|_| {});
    let f = std::fs::File::create(u.p("big")).unwrap();
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    assert!(
        std::fs::metadata(u.upper.join("big")).unwrap().blocks() * 512 >= 1 << 20,
        "allocated"
    );
    // Past 4 GiB, sparse.
    let far = 5u64 << 30;
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", far).unwrap();
    drop(f);
    let m = std::fs::metadata(u.p("big")).unwrap();
    assert_eq!(m.len(), far + 3);
    let mut tail = [0u8; 3];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(u.p("big")).unwrap(),
        &mut tail,
        far,
    )
    .unwrap();
    assert_eq!(&tail, b"end");
    // O_DIRECT with page-aligned buffers (anonymous maps are).
    let mut buf = memmap2::MmapMut::map_anon(4096).unwrap();
    buf.fill(b'd');
    let mut d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(u.p("direct"))
        .unwrap();
    d.write_all(&buf).unwrap();
    drop(d);
    let mut back = memmap2::MmapMut::map_anon(4096).unwrap();
    let mut d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(u.p("direct"))
        .unwrap();
    d.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == b'd'));
}

#[test]
fn errors_callers_rely_on() {
    let u = Union::new(|l| {
        std::fs::create_dir_all(l.join("dir/sub")).unwrap();
        std::fs::write(l.join("dir/sub/f"), b"x").unwrap();
        std::fs::write(l.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink("loop2", l.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", l.join("loop2")).unwrap();
    });
    assert_eq!(errno_of(std::fs::File::open(u.p("missing"))), libc::ENOENT);
    assert_eq!(errno_of(std::fs::remove_dir(u.p("dir"))), libc::ENOTEMPTY);
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().write(true).open(u.p("dir"))),
        libc::EISDIR
    );
    assert_eq!(errno_of(std::fs::File::open(u.p("loop1"))), libc::ELOOP);
    assert_eq!(errno_of(std::fs::File::open(u.p("file/x"))), libc::ENOTDIR);
    assert_eq!(errno_of(std::fs::remove_file(u.p("dir"))), libc::EISDIR);
    assert_eq!(errno_of(std::fs::create_dir(u.p("file"))), libc::EEXIST);
    // Renaming a lower directory works (never EXDEV), its content comes along.
    std::fs::rename(u.p("dir"), u.p("moved")).unwrap();
    assert_eq!(std::fs::read(u.p("moved/sub/f")).unwrap(), b"x");
    assert!(!u.p("dir").exists());
    // A deleted lower file stays deleted, and its name can be reused.
    std::fs::remove_file(u.p("file")).unwrap();
    assert_eq!(errno_of(std::fs::metadata(u.p("file"))), libc::ENOENT);
    std::fs::write(u.p("file"), b"again").unwrap();
    assert_eq!(std::fs::read(u.p("file")).unwrap(), b"again");
    // A component longer than NAME_MAX is ENAMETOOLONG, not ENOENT (pjdfstest checks it).
    let long = "n".repeat(256);
    assert_eq!(errno_of(std::fs::metadata(u.p(&long))), libc::ENAMETOOLONG);
    assert_eq!(
        errno_of(std::fs::write(u.p(&long), b"")),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(std::fs::metadata(u.p(&format!("moved/{long}/x")))),
        libc::ENAMETOOLONG
    );
    // An open file, unlinked, still answers fstat (link count 0) and I/O.
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(u.p("open-unlinked"))
        .unwrap();
    std::fs::remove_file(u.p("open-unlinked")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    f.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    std::os::unix::fs::FileExt::read_at(&f, &mut back, 0).unwrap();
    assert_eq!(&back, b"still here");
}

#[test]
fn no_descriptor_leaks_over_100k_opens() {
    let u = Union::new(|l| {
        std::fs::write(l.join("lower"), b"x").unwrap();
        std::fs::create_dir(l.join("d")).unwrap();
    });
    std::fs::write(u.p("upper"), b"y").unwrap();
    // RELEASE reaches the server after close returns: let in-flight ones land first. The server
    // runs in this process, beside other tests: its descriptors are the ones into this union's
    // layers.
    let mine = u.lower.parent().unwrap().to_path_buf();
    let fds = || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(&mine))
            .count()
    };
    // Warm up (the server's threads open what they keep), then measure.
    for _ in 0..100 {
        drop(std::fs::File::open(u.p("lower")).unwrap());
    }
    let before = fds();
    for i in 0..100_000 {
        match i % 4 {
            0 => drop(std::fs::File::open(u.p("lower")).unwrap()),
            1 => drop(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(u.p("upper"))
                    .unwrap(),
            ),
            2 => drop(std::fs::read_dir(u.p("d")).unwrap()),
            _ => assert!(std::fs::File::open(u.p("missing")).is_err()),
        }
    }
    let after = fds();
    assert!(
        after <= before,
        "descriptors leaked over 100k open/close cycles: {before} -> {after}"
    );
}

/// Every path below `root` with its type and permission bits and size (directories: 0), sorted.
fn walk(root: &Path) -> Vec<(PathBuf, u32, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p.clone());
            }
            let size = if m.is_dir() { 0 } else { m.len() };
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), m.mode(), size));
        }
    }
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The server caches resolved directories and the kernel caches listings across opens: a
/// change must show at once all the same, in the listing, the attributes and the lookups
/// below a renamed or deleted lower tree; deletions leave whiteouts that are links of one
/// char 0:0 (as kernel overlay's are) and kernel overlay reads the upper the same.
#[test]
fn changes_show_at_once_through_the_caches() {
    let mut u = Union::new(|l| {
        std::fs::create_dir_all(l.join("a/b/c")).unwrap();
        for f in ["a/1", "a/b/2", "a/b/c/3", "a/b/c/4"] {
            std::fs::write(l.join(f), f).unwrap();
        }
        std::fs::create_dir_all(l.join("x/y")).unwrap();
        std::fs::write(l.join("x/y/z"), b"z").unwrap();
        std::fs::create_dir(l.join("a2")).unwrap();
        std::fs::write(l.join("a2/f"), b"f").unwrap();
    });
    // Warm every cache: listings, lookups, attributes.
    assert_eq!(names(&u.p("a/b")), ["2", "c"]);
    assert_eq!(names(&u.p("a/b")), ["2", "c"]);
    let before = std::fs::metadata(u.p("a/b")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(u.p("a/b/new"), b"n").unwrap();
    assert_eq!(
        names(&u.p("a/b")),
        ["2", "c", "new"],
        "a listing kept by the kernel"
    );
    let after = std::fs::metadata(u.p("a/b")).unwrap();
    assert!(
        after.mtime_nsec() != before.mtime_nsec() || after.mtime() != before.mtime(),
        "the directory's mtime moves with a new entry"
    );
    std::fs::set_permissions(
        u.p("a/b"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(u.p("a/b")).unwrap().mode() & 0o7777,
        0o700
    );
    std::fs::remove_file(u.p("a/b/c/3")).unwrap();
    assert_eq!(names(&u.p("a/b/c")), ["4"]);

    // A lower tree renamed: lookups below the new name work, below the old one fail.
    assert_eq!(std::fs::read(u.p("x/y/z")).unwrap(), b"z");
    std::fs::rename(u.p("x"), u.p("w")).unwrap();
    assert_eq!(std::fs::read(u.p("w/y/z")).unwrap(), b"z");
    assert_eq!(errno_of(std::fs::metadata(u.p("x/y/z"))), libc::ENOENT);
    std::fs::create_dir(u.p("x")).unwrap();
    assert!(
        names(&u.p("x")).is_empty(),
        "a new dir over a renamed one is empty"
    );

    // rm -rf of the lower tree, then the same name again.
    std::fs::remove_dir_all(u.p("a")).unwrap();
    assert_eq!(errno_of(std::fs::metadata(u.p("a/b/2"))), libc::ENOENT);
    std::fs::create_dir_all(u.p("a/b")).unwrap();
    assert!(
        names(&u.p("a/b")).is_empty(),
        "nothing of the deleted tree shows"
    );
    std::fs::remove_dir_all(u.p("a")).unwrap();
    std::fs::remove_dir(u.p("x")).unwrap();
    std::fs::remove_file(u.p("a2/f")).unwrap();
    // (w is an opaque copy now: deleting below it needs no whiteout.)
    std::fs::remove_file(u.p("w/y/z")).unwrap();
    assert!(std::fs::symlink_metadata(u.upper.join("w/y/z")).is_err());
    let whiteouts: Vec<std::fs::Metadata> = ["a", "x", "a2/f"]
        .iter()
        .map(|n| std::fs::symlink_metadata(u.upper.join(n)).unwrap())
        .collect();
    for m in &whiteouts {
        use std::os::unix::fs::FileTypeExt;
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "a whiteout"
        );
        assert_eq!(
            m.ino(),
            whiteouts[0].ino(),
            "whiteouts are links of one inode"
        );
    }

    // Kernel overlay over the same lower and upper shows what FUSE showed.
    let merged = walk(&u.at);
    crate::end(u.session.take().unwrap(), &u.at);
    let work = u.upper.with_file_name("work");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        u.lower.display(),
        u.upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &u.at,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .expect("kernel overlay mounts the FUSE upper");
    let kernel = walk(&u.at);
    nix::mount::umount(&u.at).unwrap();
    assert_eq!(kernel, merged);
    assert!(merged.iter().any(|(p, _, _)| p == Path::new("w/y")));
    assert!(
        !merged.iter().any(|(p, _, _)| p.starts_with("a")
            || p.starts_with("a2/f")
            || p == Path::new("w/y/z"))
    );
}

/// The kernel caches writes (writeback) where it can: a write-only open still gets partial
/// pages right (the kernel reads the rest through our handle), O_APPEND appends at the end
/// the kernel knows, and the upper has the data once the file is closed.
#[test]
fn absent_names_are_cached_until_made_through_the_mount() {
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        std::fs::write(l.join("d/lower"), b"l").unwrap();
    });
    let gone = |n: &str| errno_of(std::fs::symlink_metadata(u.p(n))) == libc::ENOENT;
    // A missing name is asked for once, then answered by the kernel.
    assert!(gone("d/missing"));
    let asked = u.stats.lookups();
    for _ in 0..5 {
        assert!(gone("d/missing"));
    }
    assert_eq!(u.stats.lookups(), asked, "the absence is cached");
    // Every way of making a name through the mount replaces the cached absence.
    let made = ["f", "dir", "sym", "link", "moved", "fifo"];
    for n in made {
        assert!(gone(&format!("d/{n}")));
    }
    std::fs::write(u.p("d/f"), b"f").unwrap();
    std::fs::create_dir(u.p("d/dir")).unwrap();
    std::os::unix::fs::symlink("f", u.p("d/sym")).unwrap();
    std::fs::hard_link(u.p("d/f"), u.p("d/link")).unwrap();
    std::fs::write(u.p("d/tmp"), b"t").unwrap();
    std::fs::rename(u.p("d/tmp"), u.p("d/moved")).unwrap();
    nix::unistd::mkfifo(
        &u.p("d/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for n in made {
        assert!(!gone(&format!("d/{n}")), "{n} made through the mount");
    }
    assert_eq!(std::fs::read(u.p("d/sym")).unwrap(), b"f");
    assert!(gone("d/tmp"), "the name renamed away");
    // Deleted names read absent, a lower one included, and come back when made again.
    std::fs::remove_file(u.p("d/lower")).unwrap();
    std::fs::remove_dir(u.p("d/dir")).unwrap();
    assert!(gone("d/lower") && gone("d/dir"));
    assert!(gone("d/lower"), "asked again");
    std::fs::write(u.p("d/lower"), b"again").unwrap();
    assert_eq!(std::fs::read(u.p("d/lower")).unwrap(), b"again");
    assert_eq!(
        names(&u.p("d")),
        ["f", "fifo", "link", "lower", "moved", "sym"]
    );
}

#[test]
fn cached_writes_keep_file_semantics() {
    let u = Union::new(|l| std::fs::write(l.join("f"), b"0123456789").unwrap());
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(u.p("f"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&w, b"ab", 3).unwrap();
    w.flush().unwrap();
    drop(w);
    assert_eq!(std::fs::read(u.p("f")).unwrap(), b"012ab56789");
    assert_eq!(std::fs::read(u.upper.join("f")).unwrap(), b"012ab56789");
    let open_append = || {
        std::fs::OpenOptions::new()
            .append(true)
            .open(u.p("f"))
            .unwrap()
    };
    let (mut a, mut b) = (open_append(), open_append());
    a.write_all(b"A").unwrap();
    b.write_all(b"B").unwrap();
    a.write_all(b"C").unwrap();
    drop((a, b));
    assert_eq!(std::fs::read(u.p("f")).unwrap(), b"012ab56789ABC");
    assert_eq!(std::fs::read(u.upper.join("f")).unwrap(), b"012ab56789ABC");
    assert_eq!(std::fs::metadata(u.p("f")).unwrap().len(), 13);
}

/// As root the kernel passes file I/O straight to the backing files, lower ones too: reads of
/// a lower file never reach the server.
#[test]
fn lower_files_pass_through_as_root() {
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let u = Union::new(|l| std::fs::write(l.join("f"), &data).unwrap());
    assert_eq!(std::fs::read(u.p("f")).unwrap(), data);
    assert!(
        u.stats.passthrough_opens() >= 1,
        "the open of a lower file was not passed through (FUSE passthrough needs kernel 6.9+ and root)"
    );
    assert_eq!(
        u.stats.reads_served(),
        0,
        "reads of a passed-through file reached the server"
    );
}

/// One backing file per inode: a file kept open on the lower while a writer copies it up still
/// works, and so do the writer and every open after it (they see the upper copy, under an
/// inode number of its own, the same in `stat` and in the listing). The reader goes on reading
/// the lower file.
#[test]
fn opens_across_a_copy_up_all_work() {
    let u = Union::new(|l| {
        std::fs::write(l.join("f"), b"lower data").unwrap();
        std::fs::write(l.join("g"), b"lower data").unwrap();
    });
    let reader = std::fs::File::open(u.p("f")).unwrap();
    let mut head = [0u8; 5];
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut head, 0).unwrap();
    assert_eq!(&head, b"lower");
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(u.p("f"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&w, b"UPPER", 0).unwrap();
    assert_eq!(std::fs::read(u.p("f")).unwrap(), b"UPPER data");
    // A second writer, and a reader of the name, while the first reader is still open.
    let mut w2 = std::fs::OpenOptions::new()
        .append(true)
        .open(u.p("f"))
        .unwrap();
    w2.write_all(b"!").unwrap();
    drop(w2);
    assert_eq!(std::fs::read(u.p("f")).unwrap(), b"UPPER data!");
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut head, 0).unwrap();
    assert_eq!(&head, b"lower");
    let listed = std::fs::read_dir(&u.at)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "f")
        .unwrap();
    let ino = std::fs::metadata(u.p("f")).unwrap().ino();
    assert_eq!(std::os::unix::fs::DirEntryExt::ino(&listed), ino);
    drop(w);
    drop(reader);
    assert_eq!(std::fs::read(u.p("f")).unwrap(), b"UPPER data!");
    assert_eq!(std::fs::metadata(u.p("f")).unwrap().ino(), ino);
    assert_eq!(std::fs::read(u.upper.join("f")).unwrap(), b"UPPER data!");
    assert_eq!(std::fs::read(u.lower.join("f")).unwrap(), b"lower data");

    // Copied up by a truncate (no open) under a reader, then opened for writing.
    let reader = std::fs::File::open(u.p("g")).unwrap();
    nix::unistd::truncate(&u.p("g"), 3).unwrap();
    let mut w = std::fs::OpenOptions::new()
        .append(true)
        .open(u.p("g"))
        .unwrap();
    w.write_all(b"+").unwrap();
    drop((w, reader));
    assert_eq!(std::fs::read(u.p("g")).unwrap(), b"low+");
}

/// A char 0:0 made through the mount is a whiteout in the upper, so the name is not there,
/// at once (the reply to mknod must not hand the kernel an entry to cache), as on kernel
/// overlay.
#[test]
fn a_char_0_0_made_through_the_mount_is_a_whiteout() {
    let u = Union::new(|l| std::fs::write(l.join("f"), b"x").unwrap());
    let mk = |name: &str| {
        nix::sys::stat::mknod(
            &u.p(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
            0,
        )
    };
    let _ = mk("dev");
    assert_eq!(
        errno_of(std::fs::symlink_metadata(u.p("dev"))),
        libc::ENOENT
    );
    assert!(!names(&u.at).contains(&"dev".to_string()));
}

/// A write or truncate by a caller without `CAP_FSETID` clears the set-user-ID and (group
/// executable) set-group-ID bits; one by root keeps them. With passthrough the kernel leaves
/// this to the server, and the writes themselves never reach it.
#[test]
fn writes_by_others_clear_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let u = Union::new(|l| {
        for n in ["w", "t", "r"] {
            std::fs::write(l.join(n), b"data").unwrap();
            std::fs::set_permissions(l.join(n), std::fs::Permissions::from_mode(0o6777)).unwrap();
        }
    });
    let as_nobody = |cmd: String| {
        let st = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
            ])
            .arg(&cmd)
            .status()
            .unwrap();
        assert!(st.success(), "{cmd} as nobody failed");
    };
    as_nobody(format!("printf x >> {}", u.p("w").display()));
    as_nobody(format!("truncate -s 1 {}", u.p("t").display()));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(u.p("r"))
        .unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let mode = |n: &str| std::fs::metadata(u.p(n)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("w"), 0o777);
    assert_eq!(mode("t"), 0o777);
    assert_eq!(mode("r"), 0o6777);
    assert_eq!(std::fs::read(u.p("w")).unwrap(), b"datax");
    assert_eq!(std::fs::read(u.p("t")).unwrap(), b"d");
}

#[test]
fn listings_answer_lower_attributes_from_memory_and_copies_fresh() {
    use std::os::unix::fs::{DirEntryExt, PermissionsExt};
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        for i in 0..50 {
            std::fs::write(l.join(format!("d/f{i}")), b"x").unwrap();
        }
        std::fs::hard_link(l.join("d/f1"), l.join("d/link")).unwrap();
    });
    let listed = |u: &Union| -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(u.p("d"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), e.ino())
            })
            .collect();
        v.sort();
        v
    };
    let mode = |n: &str| std::fs::metadata(u.p(n)).unwrap().permissions().mode() & 0o7777;
    for i in 0..50 {
        assert_eq!(mode(&format!("d/f{i}")), 0o644); // looked up: the kernel holds them
    }
    let before = u.stats.remembered_attrs();
    let first = listed(&u);
    assert_eq!(first.len(), 51);
    assert!(
        u.stats.remembered_attrs() >= before + 50,
        "known lower files are listed without an lstat: {} -> {}",
        before,
        u.stats.remembered_attrs()
    );
    for (name, ino) in &first {
        let st = std::fs::symlink_metadata(u.p(&format!("d/{name}"))).unwrap();
        assert_eq!(st.ino(), *ino, "d_ino of {name} is its st_ino");
    }
    // Copied up (f1 with its hard link), then the directory changes, so the kernel asks for
    // the listing again: the copies' attributes are the upper's, not the remembered ones.
    for n in ["d/f0", "d/f1"] {
        std::fs::set_permissions(u.p(n), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(u.p("d/new"), b"n").unwrap();
    let again = listed(&u);
    assert_eq!(again.len(), 52);
    for n in ["d/f0", "d/f1", "d/link"] {
        assert_eq!(mode(n), 0o600, "{n} after a listing");
    }
    assert_eq!(mode("d/f2"), 0o644);
    let ino_of = |l: &[(String, u64)], n: &str| l.iter().find(|(m, _)| m == n).unwrap().1;
    for n in ["f0", "f1", "link", "f2"] {
        assert_eq!(ino_of(&first, n), ino_of(&again, n), "{n} keeps its number");
    }
}

/// Unmounts what it names when dropped (lazily: a failed test may leave users behind).
struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn listed_numbers_are_stat_numbers_over_an_overlay_of_two_filesystems() {
    // Layers on an overlayfs whose lower is another filesystem (tmpfs): there a directory's
    // `st_dev` is not its files', so the numbers `getdents` gives must not be trusted.
    let t = scratch("strata-ovl2-");
    let d = |n: &str| made(t.path(), n);
    let (tmp, ou, ow, ov) = (d("tmp"), d("ou"), d("ow"), d("ov"));
    let (upper, work, at) = (d("upper"), d("work"), d("m"));
    let mut guard = Mounted(Vec::new());
    nix::mount::mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    guard.0.push(tmp.clone());
    std::fs::create_dir(tmp.join("d")).unwrap();
    // More than one listing request holds: the later ones come without attributes.
    for i in 0..2000 {
        std::fs::write(tmp.join(format!("d/f{i}")), b"x").unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        tmp.display(),
        ou.display(),
        ow.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &ov,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    guard.0.push(ov.clone());
    let dir_dev = std::fs::metadata(ov.join("d")).unwrap().dev();
    let file_dev = std::fs::symlink_metadata(ov.join("d/f0")).unwrap().dev();
    assert_ne!(dir_dev, file_dev, "the set-up shows two st_dev");
    let stack = Stack::new(vec![
        Layer {
            root: upper,
            kind: LayerKind::Upper,
        },
        Layer {
            root: ov,
            kind: LayerKind::Lower,
        },
    ]);
    let session = strata_fuse::fs::spawn(
        strata_fuse::Union::writable(stack, work),
        &at,
        &strata_fuse::fs::config("strata-ovl2", 2, false),
    )
    .unwrap();
    let check = || {
        // Listed whole first: a lookup between two requests would make the next one carry
        // attributes too.
        let listed: Vec<(PathBuf, u64)> = std::fs::read_dir(at.join("d"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path(), std::os::unix::fs::DirEntryExt::ino(&e))
            })
            .collect();
        assert!(listed.len() >= 2000);
        for (p, ino) in listed {
            assert_eq!(std::fs::symlink_metadata(&p).unwrap().ino(), ino, "{p:?}");
        }
    };
    check(); // listed first, then looked up
    std::fs::write(at.join("d/new"), b"n").unwrap();
    check(); // listed again with every name known
    crate::end(session, &at);
}

#[test]
fn readers_go_on_in_the_listing_they_started() {
    use std::collections::BTreeSet;
    // More names than one getdents reads, so each reader comes back with an offset.
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        for i in 0..3000 {
            std::fs::write(l.join(format!("d/f{i:04}")), b"").unwrap();
        }
    });
    let all: BTreeSet<String> = (0..3000).map(|i| format!("f{i:04}")).collect();
    let read_rest = |it: std::fs::ReadDir, got: &mut Vec<String>| {
        for e in it {
            got.push(e.unwrap().file_name().to_string_lossy().into_owned());
        }
    };
    // Forty readers, each stopped after a few names: more than the union keeps listings for.
    let mut readers: Vec<(std::fs::ReadDir, Vec<String>)> = (0..40)
        .map(|_| {
            let mut it = std::fs::read_dir(u.p("d")).unwrap();
            let got = (&mut it)
                .take(5)
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            (it, got)
        })
        .collect();
    // One more, stopped the same way; then the directory changes and another reads it whole.
    let mut first = std::fs::read_dir(u.p("d")).unwrap();
    let mut got: Vec<String> = (&mut first)
        .take(5)
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    std::fs::write(u.p("d/new"), b"").unwrap();
    std::fs::remove_file(u.p("d/f2999")).unwrap();
    let mut whole = Vec::new();
    read_rest(std::fs::read_dir(u.p("d")).unwrap(), &mut whole);
    let mut expect = all.clone();
    expect.remove("f2999");
    expect.insert("new".into());
    assert_eq!(whole.iter().cloned().collect::<BTreeSet<_>>(), expect);
    assert_eq!(whole.len(), expect.len(), "no name twice");
    // The stopped reader goes on in its own listing: every name it started with, once, and
    // (POSIX leaves it open) with or without the two changed names.
    read_rest(first, &mut got);
    let seen: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(seen.len(), got.len(), "no name twice");
    for n in all.iter().filter(|n| *n != "f2999") {
        assert!(seen.contains(n), "{n} missing");
    }
    // The forty: their listings were dropped for newer ones, so they read the directory
    // again from where they were; unchanged names still come once each.
    for (it, mut got) in readers.drain(..) {
        read_rest(it, &mut got);
        let seen: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(seen.len(), got.len(), "no name twice");
        assert!(seen.len() >= 2999, "{} names", seen.len());
    }
}

#[test]
fn a_root_mount_honours_set_id_bits_and_devices_as_kernel_overlay_does() {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let u = Union::new(|l| std::fs::write(l.join("f"), b"x").unwrap());
    let flags = statvfs(&u.at).unwrap().flags();
    assert!(!flags.contains(FsFlags::ST_NOSUID), "{flags:?}");
    assert!(!flags.contains(FsFlags::ST_NODEV), "{flags:?}");
    // A set-uid program of the image runs as its owner.
    std::fs::copy("/usr/bin/id", u.p("id")).unwrap();
    std::os::unix::fs::chown(u.p("id"), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(
        u.p("id"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(u.p("id"))
        .arg("-u")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "euid of a set-uid program"
    );
}

/// Runs `calls` in a child process as user and group `id` with no supplementary groups and
/// umask 022, and checks it succeeded. `calls` makes raw system calls only: this process has
/// threads, and a forked child may not allocate or take locks.
fn as_user(id: u32, calls: impl FnOnce() -> bool) {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    // SAFETY: the child makes only system calls (no allocation, no lock) and leaves with
    // `_exit`; the parent only waits for it.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: plain system calls on values, then `_exit`, which never returns.
            unsafe {
                libc::umask(0o022);
                let ok = libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(id, id, id) == 0
                    && libc::setresuid(id, id, id) == 0
                    && calls();
                libc::_exit(if ok { 0 } else { 1 })
            }
        }
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
        }
    }
}

/// A new entry belongs to its creator, as on kernel overlay: the caller's user, and the
/// caller's group unless the directory is set-group-ID, where it takes the directory's group
/// (and a new directory the bit). A set-user-ID file made by a user keeps its bit.
#[test]
fn new_entries_belong_to_their_creator_and_set_group_id_dirs_pass_their_group_on() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let u = Union::new(|_| {});
    let perms = |m: u32| std::fs::Permissions::from_mode(m);
    std::fs::create_dir(u.p("d")).unwrap();
    std::os::unix::fs::chown(u.p("d"), None, Some(1234)).unwrap();
    std::fs::set_permissions(u.p("d"), perms(0o2777)).unwrap();
    std::fs::create_dir(u.p("u")).unwrap();
    std::fs::set_permissions(u.p("u"), perms(0o777)).unwrap();
    // As root.
    std::fs::write(u.p("d/f"), b"x").unwrap();
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(u.p("d/sub"))
        .unwrap();
    nix::unistd::mkfifo(
        &u.p("d/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("x", u.p("d/sl")).unwrap();
    // As a user outside group 1234.
    let c = |rel: &str| CString::new(u.p(rel).as_os_str().as_bytes()).unwrap();
    let (suid, uf, ud, usl, target) = (c("u/suid"), c("d/uf"), c("d/ud"), c("u/usl"), c("t"));
    as_user(65534, || {
        // SAFETY: system calls on NUL-terminated paths made before the fork.
        unsafe {
            let made = |fd: i32| fd >= 0 && libc::close(fd) == 0;
            made(libc::open(
                suid.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o4755,
            )) && made(libc::open(
                uf.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o2755,
            )) && libc::mkdir(ud.as_ptr(), 0o755) == 0
                && libc::symlink(target.as_ptr(), usl.as_ptr()) == 0
        }
    });
    let owner = |rel: &str| {
        let m = std::fs::symlink_metadata(u.p(rel)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner("d/f"), (0, 1234, 0o644));
    assert_eq!(owner("d/sub"), (0, 1234, 0o2750));
    assert_eq!(owner("d/fifo"), (0, 1234, 0o644));
    assert_eq!(owner("d/sl").0, 0);
    assert_eq!(owner("d/sl").1, 1234);
    assert_eq!(owner("u/suid"), (65534, 65534, 0o4755));
    // Not of the directory's group: the kernel drops set-group-ID from the mode it asks for.
    assert_eq!(owner("d/uf"), (65534, 1234, 0o755));
    assert_eq!(owner("d/ud"), (65534, 1234, 0o2755));
    assert_eq!(owner("u/usl").0, 65534);
    assert_eq!(owner("u/usl").1, 65534);
    // The upper holds the same.
    let m = std::fs::symlink_metadata(u.upper.join("d/sub")).unwrap();
    assert_eq!((m.gid(), m.mode() & 0o7777), (1234, 0o2750));
}

/// New entries take the creator's umask, not the server's, or a directory's default ACL
/// instead; ACLs count in permission checks, granting and denying, as on kernel overlay.
#[test]
fn the_creators_umask_and_posix_acls_rule_as_on_kernel_overlay() {
    use std::os::unix::fs::PermissionsExt;
    let u = Union::new(|l| {
        std::fs::write(l.join("f"), b"secret").unwrap();
        std::fs::set_permissions(l.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    let sh = |cmd: String| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let p = |rel: &str| u.p(rel).display().to_string();
    let mode = |rel: &str| std::fs::symlink_metadata(u.p(rel)).unwrap().mode() & 0o7777;
    // The server runs in this process, under its umask (022 as a rule); the callers' differ.
    sh(format!(
        "umask 002; touch {x}; mkdir {d}; mkfifo {ff}; umask 0; touch {y}",
        x = p("x"),
        d = p("dd"),
        ff = p("ff"),
        y = p("y")
    ));
    assert_eq!(mode("x"), 0o664);
    assert_eq!(mode("dd"), 0o775);
    assert_eq!(mode("ff"), 0o664);
    assert_eq!(mode("y"), 0o666);
    let as_nobody = |gid: u32, cmd: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .args(["sh", "-c", cmd])
            .output()
            .unwrap()
    };
    let cat = format!("cat {}", p("f"));
    assert!(!as_nobody(65534, &cat).status.success(), "mode 600");
    // An ACL entry grants what the mode does not.
    sh(format!("setfacl -m u:65534:r {}", p("f")));
    let out = as_nobody(65534, &cat);
    assert!(out.status.success(), "granted by the ACL: {out:?}");
    assert_eq!(out.stdout, b"secret");
    // And a named-user entry denies what the owning group's bits would allow.
    sh(format!(
        "chmod 640 {f}; chgrp 1234 {f}; setfacl -m u:65534:- {f}",
        f = p("f")
    ));
    assert!(
        !as_nobody(1234, &cat).status.success(),
        "denied by the ACL's named-user entry"
    );
    // A default ACL replaces the umask and passes on.
    sh(format!(
        "mkdir {d}; setfacl -d -m u:65534:rwx {d}; umask 077; touch {d}/new; mkdir {d}/sub",
        d = p("acl")
    ));
    assert_eq!(mode("acl/new"), 0o664);
    assert_eq!(mode("acl/sub"), 0o775);
    let acl = sh(format!("getfacl -c {}", p("acl/sub")));
    assert!(acl.contains("default:user:nobody:rwx"), "{acl}");
}

/// Every listing has "." and ".." once, with the directory's and its parent's numbers, as a
/// readdir of kernel overlay (or any Linux filesystem) has: with attributes (readdirplus, the
/// first read) or without, and in a listing longer than one reply.
#[test]
fn listings_have_dot_and_dot_dot() {
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("big")).unwrap();
        for i in 0..3000 {
            std::fs::write(l.join(format!("big/f{i}")), b"").unwrap();
        }
        std::fs::create_dir(l.join("lower")).unwrap();
    });
    std::fs::create_dir(u.p("fresh")).unwrap();
    std::fs::write(u.p("big/new"), b"").unwrap();
    let ino = |rel: &str| std::fs::metadata(u.p(rel)).unwrap().ino();
    for (dir, parent, entries) in [
        ("", "", 3),
        ("big", "", 3001),
        ("lower", "", 0),
        ("fresh", "", 0),
    ] {
        for pass in 0..2 {
            let mut d = nix::dir::Dir::open(
                &u.p(dir),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            let all: Vec<(String, u64)> = d
                .iter()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name().to_string_lossy().into_owned(), e.ino())
                })
                .collect();
            let dots: Vec<_> = all
                .iter()
                .filter(|(n, _)| n == "." || n == "..")
                .cloned()
                .collect();
            assert_eq!(
                dots,
                [(".".to_string(), ino(dir)), ("..".to_string(), ino(parent))],
                "{dir:?}, read {pass}"
            );
            assert_eq!(all.len(), entries + 2, "{dir:?}, read {pass}");
        }
    }
}

/// `renameat2(RENAME_EXCHANGE)` swaps two names atomically, as on kernel overlay: files
/// (their numbers go with them), a file and a directory, and directories with lower content
/// (where kernel overlay answers EXDEV, the union copies them up whole, as for a rename). The
/// upper mounts the same with kernel overlay afterwards.
#[test]
fn rename_exchange_swaps_two_names() {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    let u = Union::new(|l| {
        std::fs::write(l.join("fa"), b"la").unwrap();
        std::fs::write(l.join("fb"), b"lb").unwrap();
        for (d, f) in [("da", "x"), ("db", "y")] {
            std::fs::create_dir(l.join(d)).unwrap();
            std::fs::write(l.join(d).join(f), b"").unwrap();
        }
    });
    let swap = |a: &str, b: &str| {
        renameat2(
            AT_FDCWD,
            &u.p(a),
            AT_FDCWD,
            &u.p(b),
            RenameFlags::RENAME_EXCHANGE,
        )
    };
    let ino = |rel: &str| std::fs::metadata(u.p(rel)).unwrap().ino();
    let list = |rel: &str| {
        let mut v: Vec<String> = std::fs::read_dir(u.p(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (fa, fb) = (ino("fa"), ino("fb"));
    swap("fa", "fb").unwrap();
    assert_eq!(std::fs::read(u.p("fa")).unwrap(), b"lb");
    assert_eq!(std::fs::read(u.p("fb")).unwrap(), b"la");
    assert_eq!((ino("fa"), ino("fb")), (fb, fa));
    std::fs::create_dir(u.p("ua")).unwrap();
    std::fs::write(u.p("ua/k"), b"k").unwrap();
    swap("ua", "fa").unwrap();
    assert_eq!(std::fs::read(u.p("ua")).unwrap(), b"lb");
    assert_eq!(list("fa"), ["k"]);
    swap("da", "db").unwrap();
    assert_eq!(
        (list("da"), list("db")),
        (vec!["y".to_string()], vec!["x".to_string()])
    );
    assert_eq!(swap("da", "missing"), Err(nix::errno::Errno::ENOENT));
    // The upper, as kernel overlay reads it (beside the FUSE mount: all is on disk).
    let m = tempfile::tempdir_in("/var/tmp").unwrap();
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (l, up) = (u.lower.clone(), u.upper.clone());
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            l.display(),
            up.display(),
            work.path().display()
        ))
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success(), "kernel overlay over the union's upper");
    let read = |rel: &str| std::fs::read_dir(m.path().join(rel)).unwrap().count();
    let (da_y, db_x) = (
        m.path().join("da/y").exists(),
        m.path().join("db/x").exists(),
    );
    let (n_da, n_db) = (read("da"), read("db"));
    nix::mount::umount(m.path()).unwrap();
    assert!(da_y && db_x);
    assert_eq!((n_da, n_db), (1, 1));
}

/// SEEK_DATA and SEEK_HOLE find a sparse file's holes, lower or copied up, as on kernel
/// overlay (so `cp` and `tar` keep it sparse), and data just written is data. A copy-up keeps
/// the holes unallocated.
#[test]
fn seek_data_and_hole_find_a_sparse_files_holes() {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::FileExt;
    let u = Union::new(|l| {
        let f = std::fs::File::create(l.join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"data", 600_000).unwrap();
    });
    let f = std::fs::File::open(u.p("sparse")).unwrap();
    assert_eq!(lseek(&f, 0, Whence::SeekData).unwrap(), 598_016);
    assert_eq!(lseek(&f, 0, Whence::SeekHole).unwrap(), 0);
    assert_eq!(
        lseek(&f, 700_000, Whence::SeekData),
        Err(nix::errno::Errno::ENXIO)
    );
    drop(f);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(u.p("sparse"))
        .unwrap();
    f.write_all_at(b"more", 900_000).unwrap();
    let copy = std::fs::metadata(u.upper.join("sparse")).unwrap();
    assert_eq!(copy.len(), 1 << 20);
    assert!(copy.blocks() <= 64, "{} blocks of 512 bytes", copy.blocks());
    assert_eq!(lseek(&f, 700_000, Whence::SeekData).unwrap(), 897_024);
    assert_eq!(lseek(&f, 900_000, Whence::SeekHole).unwrap(), 901_120);
}
