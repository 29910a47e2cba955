//! A container's output and input: the json-file log, the threads that copy output into it
//! (and to the attached terminal), and raw mode for `-t`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::json;

use crate::{Error, Result};

/// Docker's json-file log: one JSON object per line,
/// `{"log":"text\n","stream":"stdout","time":"2026-12-01T20:15:34.123456789Z"}`.
pub struct Log(Mutex<File>);

/// A line longer than this is logged in pieces, as Docker's json-file driver does.
const MAX_LINE: usize = 16 * 1024;

impl Log {
    /// Opens (appending to) the log at `path`.
    pub fn open(path: &Path) -> Result<Arc<Log>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open log", path, e))?;
        Ok(Arc::new(Log(Mutex::new(f))))
    }

    fn entry(&self, stream: &str, data: &[u8]) {
        let mut line = json!({
            "log": String::from_utf8_lossy(data),
            "stream": stream,
            "time": crate::time::now(),
        })
        .to_string();
        line.push('\n');
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A full disk must not stop the container: its output is dropped, not its run.
        let _ = f.write_all(line.as_bytes());
    }
}

/// Where a pump echoes what it copies (the attached terminal), switchable off.
#[derive(Clone)]
pub struct Echo(Arc<Mutex<Option<File>>>);

impl Echo {
    /// An echo to `to` (none when `None`).
    pub fn new(to: Option<File>) -> Echo {
        Echo(Arc::new(Mutex::new(to)))
    }

    /// Stops echoing and closes the file.
    pub fn off(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn write(&self, data: &[u8]) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = g.as_mut() {
            // A gone reader stops the echo, not the container.
            if w.write_all(data).and_then(|()| w.flush()).is_err() {
                *g = None;
            }
        }
    }
}

/// Copies `src` to its end into `log` as `stream` ("stdout"/"stderr"), each line one entry,
/// and to `echo` as it comes.
pub fn pump(mut src: File, log: Arc<Log>, stream: &'static str, echo: Echo) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut line: Vec<u8> = Vec::new();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO: a pseudo-terminal whose other side is closed; that is its end.
                Err(_) => break,
            };
            echo.write(&buf[..n]);
            line.extend_from_slice(&buf[..n]);
            while let Some(i) = line.iter().position(|&b| b == b'\n') {
                log.entry(stream, &line[..=i]);
                line.drain(..=i);
            }
            if line.len() >= MAX_LINE {
                log.entry(stream, &line);
                line.clear();
            }
        }
        if !line.is_empty() {
            log.entry(stream, &line);
        }
    })
}

/// Copies `src` into `dst` until either ends (stdin into a pseudo-terminal). Not joined: it
/// may sit in a read of the terminal when the container ends.
pub fn forward(mut src: File, mut dst: File) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 || dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// A duplicate of `fd` as a `File`.
pub fn file_of(fd: impl AsFd) -> Result<File> {
    fd.as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Error::io("duplicate fd", "", e))
}

/// Raw mode on a terminal for as long as it lives (restored on drop), so keys reach the
/// container's terminal unprocessed.
pub struct RawMode {
    fd: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Raw mode on `fd` when it is a terminal; `None` otherwise.
    pub fn enter(fd: impl AsFd) -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let fd = fd.as_fd().try_clone_to_owned().ok()?;
        let saved = tcgetattr(&fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

/// Prints a container's log: every entry (or the last `tail`), optionally with its time; with
/// `follow`, keeps printing new entries until `running()` turns false.
pub fn print_log(
    path: &Path,
    tail: Option<usize>,
    timestamps: bool,
    follow: bool,
    running: impl Fn() -> bool,
) -> Result<()> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(()),
        Err(e) => return Err(Error::io("open log", path, e)),
    };
    let mut pending = Vec::new();
    let mut first = true;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        let still = running();
        let mut chunk = Vec::new();
        f.read_to_end(&mut chunk)
            .map_err(|e| Error::io("read log", path, e))?;
        pending.extend_from_slice(&chunk);
        let end = pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let lines: Vec<&[u8]> = pending[..end]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let skip = match (first, tail) {
            (true, Some(t)) => lines.len().saturating_sub(t),
            _ => 0,
        };
        for l in &lines[skip..] {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) else {
                continue;
            };
            let text = v["log"].as_str().unwrap_or_default();
            let w: &mut dyn Write = if v["stream"] == "stderr" {
                &mut err
            } else {
                &mut out
            };
            let r = if timestamps {
                write!(w, "{} {text}", v["time"].as_str().unwrap_or_default())
            } else {
                w.write_all(text.as_bytes())
            };
            if r.and_then(|()| w.flush()).is_err() {
                return Ok(());
            }
        }
        pending.drain(..end);
        first = false;
        if !follow || !still {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A connected pair of unix stream sockets, to pass a terminal's master fd between processes.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("create a socket pair", "", e.into()))
}

/// Sends `fd` over unix socket `sock` (SCM_RIGHTS).
pub fn send_fd(sock: impl AsFd, fd: impl AsFd) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let raw = [fd.as_fd().as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"T")];
    sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| Error::io("send the terminal", "", e.into()))?;
    Ok(())
}

/// Receives one fd from unix socket `sock`; `None` if the other side closed without sending.
pub fn recv_fd(sock: impl AsFd) -> Result<Option<OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io("receive the terminal", "", e.into()))?;
    for c in msg
        .cmsgs()
        .map_err(|e| Error::io("receive the terminal", "", e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                return Ok(Some(crate::sys::adopt_received_fd(fd)));
            }
        }
    }
    Ok(None)
}

/// A new pseudo-terminal from `/dev/ptmx` of the current root (a container's own devpts, so
/// the terminal exists by name inside it): (master, slave).
pub fn open_pty() -> Result<(OwnedFd, File)> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let err = |e: nix::Error| Error::io("open a pseudo-terminal", "/dev/ptmx", e.into());
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(err)?;
    grantpt(&master).map_err(err)?;
    unlockpt(&master).map_err(err)?;
    let name = ptsname_r(&master).map_err(err)?;
    use std::os::unix::fs::OpenOptionsExt;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(|e| Error::io("open", &name, e))?;
    Ok((OwnedFd::from(master), slave))
}
