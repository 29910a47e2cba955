//! Thin wrappers over the raw syscalls this crate needs.
//!
//! Every function takes borrowed fds and C strings and returns `io::Result`, so that the rest of
//! the crate stays free of `unsafe`. Paths relative to a directory fd never follow a symlink in
//! their last component unless the caller asks for it.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_fd(r: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(r)?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A C string from raw bytes; a NUL inside is an `InvalidInput` error.
pub fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// A C string from an `OsStr`.
pub fn os_cstr(s: &OsStr) -> io::Result<CString> {
    cstr(s.as_bytes())
}

/// `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: the path
/// must stay below `dir` and no component may be a symlink.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    /// `struct open_how` of `<linux/openat2.h>` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: mode as u64,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `how` is a valid open_how of the size passed; `path` is NUL-terminated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    cvt_fd(r as libc::c_int)
}

/// `openat(2)`; add `O_NOFOLLOW` to refuse a symlink as the last component.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt_fd(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat(2)`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

/// `symlinkat(2)`.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(2)` without following a symlink at the old path.
pub fn linkat(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated; the fds are borrowed for the call.
    cvt(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `unlinkat(2)`; pass `libc::AT_REMOVEDIR` to remove an empty directory.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `fstatat(2)` with `AT_SYMLINK_NOFOLLOW`; an empty name stats `dir` itself.
pub fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `st` is valid for writes of a stat; `name` is NUL-terminated.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled in `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fchownat(2)` with `AT_SYMLINK_NOFOLLOW` (an empty name changes `dir` itself).
pub fn lchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// `fchmod(2)`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// Sets atime and mtime to `(sec, nsec)` without following a symlink: `utimensat(2)` with
/// `AT_SYMLINK_NOFOLLOW` on `name`, or `futimens(3)` on `dir` itself when `name` is empty.
pub fn lutimesat(dir: BorrowedFd<'_>, name: &CStr, sec: i64, nsec: u32) -> io::Result<()> {
    lutimes2(dir, name, (sec, nsec), (sec, nsec))
}

/// `syncfs(2)`.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// `readlinkat(2)` of `name` below `dir`.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// The names in directory `dir` (without `.` and `..`), with their `d_type`.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u8)>> {
    // fdopendir takes ownership of the fd it is given, so give it a duplicate.
    let dup = dir.try_clone_to_owned()?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
    // SAFETY: `raw` is an open directory fd whose ownership passes to the DIR stream.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    // SAFETY: rewinding a valid DIR stream; the duplicate shares the offset with `dir`.
    unsafe { libc::rewinddir(stream) };
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR stream used by this thread only.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let (name, kind) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
        let name = name.to_bytes();
        if name != b"." && name != b".." {
            out.push((name.to_vec(), kind));
        }
    };
    // SAFETY: `stream` is valid and closed exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

/// The path of an open fd under `/proc/self/fd`, joined with `name` (for the xattr calls that
/// only take paths). The magic link resolves to the fd's own file, so no lookup by name happens
/// above it.
fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if !name.is_empty() {
        p.push(b'/');
        p.extend_from_slice(name.to_bytes());
    }
    cstr(&p)
}

/// `lsetxattr(2)` of `name` below `dir`.
pub fn lsetxattr(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr, value: &[u8]) -> io::Result<()> {
    let path = proc_path(dir, name)?;
    // SAFETY: `value` is valid for reads of its length; the strings are NUL-terminated.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `fsetxattr(2)` on an open file.
pub fn fsetxattr(fd: BorrowedFd<'_>, attr: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of its length; `attr` is NUL-terminated.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `major(3)` of a device number.
pub fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// `minor(3)` of a device number.
pub fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// `makedev(3)`.
pub fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xffff_f000) << 32)
        | ((ma & 0x0000_0fff) << 8)
        | ((mi & 0xffff_ff00) << 12)
        | (mi & 0xff)
}

/// The new mount API: `fsopen(2)`.
pub fn fsopen(fstype: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `fstype` is NUL-terminated; FSOPEN_CLOEXEC is the only flag.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsopen,
            fstype.as_ptr(),
            1, /* FSOPEN_CLOEXEC */
        )
    };
    cvt_fd(r as libc::c_int)
}

const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

fn fsconfig(
    fs: BorrowedFd<'_>,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> io::Result<()> {
    let key = key.map_or(std::ptr::null(), CStr::as_ptr);
    let value = value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: key and value are NULL or NUL-terminated strings, as the command requires.
    let r = unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) };
    cvt(r as libc::c_int).map(drop)
}

/// `fsconfig(FSCONFIG_SET_STRING)`.
pub fn fsconfig_string(fs: BorrowedFd<'_>, key: &CStr, value: &CStr) -> io::Result<()> {
    fsconfig(fs, FSCONFIG_SET_STRING, Some(key), Some(value))
}

/// `fsconfig(FSCONFIG_SET_FLAG)`.
pub fn fsconfig_flag(fs: BorrowedFd<'_>, key: &CStr) -> io::Result<()> {
    fsconfig(fs, FSCONFIG_SET_FLAG, Some(key), None)
}

/// `fsconfig(FSCONFIG_CMD_CREATE)`.
pub fn fsconfig_create(fs: BorrowedFd<'_>) -> io::Result<()> {
    fsconfig(fs, FSCONFIG_CMD_CREATE, None, None)
}

/// `fsmount(2)`, with `MOUNT_ATTR_RDONLY` when asked.
pub fn fsmount(fs: BorrowedFd<'_>, readonly: bool) -> io::Result<OwnedFd> {
    let attrs: libc::c_uint = if readonly { 0x1 } else { 0 };
    // SAFETY: plain syscall on a borrowed fd; FSMOUNT_CLOEXEC = 1.
    let r = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), 1u32, attrs) };
    cvt_fd(r as libc::c_int)
}

/// `move_mount(2)` of a detached mount onto `target`.
pub fn move_mount(mnt: BorrowedFd<'_>, target: &CStr) -> io::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    // SAFETY: the empty string and `target` are NUL-terminated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    cvt(r as libc::c_int).map(drop)
}

/// The messages the kernel left in a filesystem context (`e ...`, `w ...` lines), joined.
pub fn fs_messages(fs: BorrowedFd<'_>) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push(
            String::from_utf8_lossy(&buf[..n as usize])
                .trim_end()
                .to_string(),
        );
    }
    out.join("; ")
}

/// `umount2(2)`.
pub fn umount(target: &CStr, detach: bool) -> io::Result<()> {
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: `target` is NUL-terminated.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// Classic `mount(2)`, used for bind mounts.
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: u64,
    data: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: all strings are NULL or NUL-terminated.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags as libc::c_ulong,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
    .map(drop)
}

/// `fchmodat(2)`; follows a symlink in the last component, so use it only on names the caller
/// just created itself (devices and fifos, which cannot be opened to fchmod).
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the fd is borrowed for the call.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

/// Calls an xattr syscall that fills a buffer, growing it on `ERANGE` (up to 1 MiB). `Ok(None)`
/// for `ENODATA` (no such attribute) and, when `absent_ok`, `ENOTSUP` (no xattrs here).
fn xattr_buf(
    absent_ok: bool,
    mut call: impl FnMut(&mut [u8]) -> isize,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = call(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ENOTSUP) if absent_ok => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 8, 0),
            _ => return Err(e),
        }
    }
}

/// Splits a NUL-separated xattr name list.
fn names(list: Option<Vec<u8>>) -> Vec<Vec<u8>> {
    list.unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// `lgetxattr(2)` of `name` below `dir` (the last component is not followed). `Ok(None)` when
/// the attribute is absent.
pub fn lgetxattr(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr) -> io::Result<Option<Vec<u8>>> {
    let path = proc_path(dir, name)?;
    xattr_buf(false, |buf| {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the strings are NUL-terminated.
        unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                attr.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
}

/// `llistxattr(2)` of `name` below `dir`: the attribute names.
pub fn llistxattr(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<Vec<u8>>> {
    let path = proc_path(dir, name)?;
    xattr_buf(true, |buf| {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the path is NUL-terminated.
        unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
    .map(names)
}

/// `fgetxattr(2)`; `Ok(None)` when the attribute is absent.
pub fn fgetxattr(fd: BorrowedFd<'_>, attr: &CStr) -> io::Result<Option<Vec<u8>>> {
    xattr_buf(false, |buf| {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `attr` is NUL-terminated.
        unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                attr.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
}

/// `flistxattr(2)`: the attribute names of an open file.
pub fn flistxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    xattr_buf(true, |buf| {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
    })
    .map(names)
}

/// Sets atime and mtime separately, without following a symlink (`utimensat(2)`).
pub fn lutimes2(
    dir: BorrowedFd<'_>,
    name: &CStr,
    atime: (i64, u32),
    mtime: (i64, u32),
) -> io::Result<()> {
    let ts = |(s, n): (i64, u32)| libc::timespec {
        tv_sec: s,
        tv_nsec: n as _,
    };
    let times = [ts(atime), ts(mtime)];
    let r = if name.is_empty() {
        // SAFETY: `times` holds the two timespecs futimens requires.
        unsafe { libc::futimens(dir.as_raw_fd(), times.as_ptr()) }
    } else {
        // SAFETY: as above; `name` is NUL-terminated.
        unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }
    };
    cvt(r).map(drop)
}

/// `lremovexattr(2)` of `name` below `dir`; an absent attribute is fine.
pub fn lremovexattr(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr) -> io::Result<()> {
    let path = proc_path(dir, name)?;
    // SAFETY: the strings are NUL-terminated.
    match cvt(unsafe { libc::lremovexattr(path.as_ptr(), attr.as_ptr()) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r.map(drop),
    }
}

/// `fremovexattr(2)` on an open file; an absent attribute is fine.
pub fn fremovexattr(fd: BorrowedFd<'_>, attr: &CStr) -> io::Result<()> {
    // SAFETY: `attr` is NUL-terminated; the fd is borrowed for the call.
    match cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), attr.as_ptr()) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
        r => r.map(drop),
    }
}
