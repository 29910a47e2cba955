//! The raw syscalls the runtime needs that nix does not wrap: bringing up the loopback
//! interface, dropping capabilities from the bounding set, replacing standard descriptors.
#![allow(unsafe_code)]

use std::io;

/// Sets `lo` up in the current network namespace (what `ip link set lo up` does).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut req = std::mem::MaybeUninit::<libc::ifreq>::zeroed();
    // SAFETY: ifreq is plain old data; zeroed is a valid value and we fill the name.
    let req = unsafe {
        let r = req.as_mut_ptr();
        for (i, b) in b"lo\0".iter().enumerate() {
            (*r).ifr_name[i] = *b as libc::c_char;
        }
        req.assume_init_mut()
    };
    // SAFETY: SIOCGIFFLAGS reads the flags into `req`, a valid ifreq.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops capability `cap` from the bounding set (`PR_CAPBSET_DROP`); unknown ones are fine.
pub fn drop_bounding(cap: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Sets the given signals to be ignored (`SIG_IGN`) in this process.
pub fn ignore_signals(sigs: &[libc::c_int]) {
    for &s in sigs {
        // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety concerns.
        unsafe { libc::signal(s, libc::SIG_IGN) };
    }
}

/// Restores the default action of the given signals (an ignored signal stays ignored across
/// exec, so a container's process must get them back).
pub fn default_signals(sigs: &[libc::c_int]) {
    for &s in sigs {
        // SAFETY: SIG_DFL installs no handler code.
        unsafe { libc::signal(s, libc::SIG_DFL) };
    }
}

/// Makes the terminal on `fd` the controlling terminal of this process, which must be a
/// session leader (`TIOCSCTTY`).
pub fn set_controlling_tty(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCSCTTY takes an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A terminal's window size (`TIOCGWINSZ`), or `None` when `fd` is not a terminal.
pub fn window_size(fd: std::os::fd::BorrowedFd<'_>) -> Option<libc::winsize> {
    use std::os::fd::AsRawFd;
    let mut ws = std::mem::MaybeUninit::<libc::winsize>::zeroed();
    // SAFETY: TIOCGWINSZ writes one winsize into the valid buffer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, ws.as_mut_ptr()) };
    // SAFETY: the ioctl succeeded, so it filled `ws` (zeroed before anyway).
    (r == 0).then(|| unsafe { ws.assume_init() })
}

/// Sets a terminal's window size (`TIOCSWINSZ`).
pub fn set_window_size(fd: std::os::fd::BorrowedFd<'_>, ws: &libc::winsize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCSWINSZ reads one winsize from a valid reference.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, ws as *const libc::winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s child a session leader whose controlling terminal is its stdin (which must
/// be a terminal): what a shell on a pseudo-terminal needs for job control and `^C`.
pub fn spawn_on_terminal(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls are made (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock ticks since boot):
/// with the pid, it names a process uniquely, as pids get reused.
pub fn process_start(pid: i64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Takes ownership of an fd the kernel just installed in this process through `SCM_RIGHTS`.
pub fn adopt_received_fd(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: recvmsg installed `fd` for this process alone; nothing else owns or closes it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Makes standard descriptor `to` (0, 1 or 2) a copy of `from` (`dup2`).
pub fn replace_stdio(from: std::os::fd::BorrowedFd<'_>, to: i32) -> io::Result<()> {
    assert!((0..=2).contains(&to), "only stdio is replaced");
    // SAFETY: `from` is a valid open fd; dup2 atomically replaces `to`, which nobody owns as
    // an OwnedFd (the standard streams use it by number).
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&from), to) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
