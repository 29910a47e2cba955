//! The raw syscalls the runtime needs that nix does not wrap: bringing up the loopback
//! interface, dropping capabilities from the bounding set.
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
