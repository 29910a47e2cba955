//! Integration tests of the FUSE crate.

mod model;
mod posix;
mod scale;

/// Unmounts the union served by `session` at `at` and waits for its server to end. The unmount
/// is retried while it is busy: another test's child process, between its fork and its exec,
/// briefly holds copies of this process's descriptors, some of them on the mount.
pub fn end(session: fuser::BackgroundSession, at: &std::path::Path) {
    let t0 = std::time::Instant::now();
    loop {
        match nix::mount::umount(at) {
            Ok(()) => break,
            Err(nix::errno::Errno::EBUSY) if t0.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("unmounting {}: {e}", at.display()),
        }
    }
    strata_fuse::fs::ended(session.join()).unwrap();
}
