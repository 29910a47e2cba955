//! Shared helpers for the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `strata` binary under test.
pub fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// `strata --root ROOT`.
pub fn st(root: &Path) -> Command {
    let mut c = strata();
    c.arg("--root").arg(root);
    c
}

/// Panics unless root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "these tests need root: run the suite as root"
    );
}

/// Panics unless `cmd` is on PATH.
pub fn require_command(cmd: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs `{cmd}` (scripts/test-all.sh installs it)"
    );
}

/// Runs `cmd` and returns stdout, panicking with stderr on failure.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns its output whatever the status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// A scratch dir on the real disk, with a short path (unix sockets live in it).
pub fn scratch() -> tempfile::TempDir {
    std::fs::create_dir_all("/var/tmp").unwrap();
    tempfile::Builder::new()
        .prefix("st-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// Waits until `path` exists (a socket being created).
pub fn wait_for(path: &Path, what: &str) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A snapshotter server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(root: &Path, socket: &Path) -> Server {
        Self::start_with(root, socket, &[])
    }

    /// [`Server::start`] with more arguments (`--mode fuse`).
    pub fn start_with(root: &Path, socket: &Path, args: &[&str]) -> Server {
        let _ = std::fs::remove_file(socket);
        // Its log goes beside the socket (appended across restarts), for a client that
        // cannot connect to show (see `client`).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(server_log(socket))
            .unwrap();
        let child = strata()
            .args(["snapshotter", "serve"])
            .args(args)
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(socket)
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for(socket, "strata snapshotter serve");
        Server {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    /// SIGKILL, no cleanup.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a two-layer OCI image with umoci from busybox-static: layer 1 has /etc/from-lower
/// and /etc/to-delete, layer 2 deletes /etc/to-delete and adds /etc/upper-file. Returns the
/// OCI layout directory.
pub fn build_image(dir: &Path) -> PathBuf {
    require_command("umoci");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is needed for the test image");
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:latest", layout.display());
    ok(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    ok(Command::new("umoci").args(["new", "--image", &image]));
    ok(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    for d in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for c in [
        "sh", "cat", "test", "ls", "echo", "true", "sleep", "ps", "tty", "rm", "mkdir", "touch",
        "grep", "ln", "hostname", "stat", "wc",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(c)).unwrap();
    }
    std::fs::write(root.join("etc/from-lower"), "from the lower layer\n").unwrap();
    std::fs::write(root.join("etc/to-delete"), "deleted above\n").unwrap();
    ok(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    std::fs::remove_dir_all(&bundle).unwrap();
    ok(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    std::fs::remove_file(root.join("etc/to-delete")).unwrap();
    std::fs::write(root.join("etc/upper-file"), "from the upper layer\n").unwrap();
    ok(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    ok(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));
    layout
}

/// A gRPC client of the snapshotter on `socket`.
pub async fn client(
    socket: PathBuf,
) -> strata_snapshotter::api::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient<
    tonic::transport::Channel,
> {
    match strata_snapshotter::connect(&socket).await {
        Ok(c) => c,
        Err(e) => {
            let log = std::fs::read_to_string(server_log(&socket)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            panic!(
                "{e}; the socket {} there; the server's log ends:\n{}",
                if socket.exists() { "is" } else { "is not" },
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        }
    }
}

/// Where [`Server`] writes the log of the server on `socket`.
fn server_log(socket: &Path) -> PathBuf {
    socket.with_extension("log")
}

/// [`build_image`], tarred as an OCI layout archive at `dir/file`.
pub fn image_archive(dir: &Path, file: &str) -> PathBuf {
    let layout = build_image(dir);
    let archive = dir.join(file);
    ok(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    archive
}

/// A store at `dir/root` with [`build_image`] loaded as `localhost/img:latest`.
pub fn loaded(dir: &Path) -> PathBuf {
    let archive = image_archive(dir, "img.tar");
    let root = dir.join("root");
    assert_eq!(
        ok(st(&root).arg("load").arg("-i").arg(&archive)),
        "Loaded image: localhost/img:latest\n"
    );
    root
}

/// Runs `cmd`, expecting failure with `needle` in stderr; returns stderr.
pub fn fails(cmd: &mut Command, needle: &str) -> String {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains(needle),
        "{cmd:?}: expected a failure mentioning {needle:?}, got {:?}:\n{err}",
        out.status
    );
    err
}

/// Polls `f` until it is true (up to 10 s).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
