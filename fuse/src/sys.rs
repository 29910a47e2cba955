//! The raw syscalls the FUSE filesystem needs that nix does not wrap (path xattrs), and a
//! thread-own umask.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// `lgetxattr(2)`: the value of `name` on `path` (not following a final symlink).
pub fn lgetxattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is valid for writes of its length; both strings are NUL-terminated.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 16 {
            buf.resize(buf.len() * 8, 0);
            continue;
        }
        return Err(e);
    }
}

/// `lsetxattr(2)`.
pub fn lsetxattr(path: &Path, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    // SAFETY: `value` is valid for reads of its length; both strings are NUL-terminated.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `llistxattr(2)`: the NUL-separated attribute names of `path`.
pub fn llistxattr(path: &Path) -> io::Result<Vec<u8>> {
    let p = c(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `buf` is valid for writes of its length; the path is NUL-terminated.
        let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 8, 0);
            continue;
        }
        return Err(e);
    }
}

/// `lremovexattr(2)`.
pub fn lremovexattr(path: &Path, name: &OsStr) -> io::Result<()> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    // SAFETY: both strings are NUL-terminated.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with this thread's umask set to `mask`, then puts the thread's umask back.
///
/// A new entry is made as the caller's system call would have made it: the backing
/// filesystem then applies the caller's umask, or, under a directory with a default ACL,
/// the ACL instead, as the kernel does for kernel overlay's upper. The first call on a thread
/// gives the thread its own umask (`unshare(CLONE_FS)`), so requests on other threads and
/// the rest of the process keep theirs. A caller whose umask is the thread's own (the common
/// case) costs no system call.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> io::Result<T> {
    use nix::sys::stat::{Mode, umask};
    thread_local! {
        /// The thread's own umask, once it has one.
        static OWN: std::cell::Cell<Option<Mode>> = const { std::cell::Cell::new(None) };
    }
    let own = match OWN.get() {
        Some(m) => m,
        None => {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(io::Error::from)?;
            let m = umask(Mode::empty());
            umask(m);
            OWN.set(Some(m));
            m
        }
    };
    let want = Mode::from_bits_truncate(mask & 0o777);
    if want == own {
        return Ok(f());
    }
    umask(want);
    let out = f();
    umask(own);
    Ok(out)
}
