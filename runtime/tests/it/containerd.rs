//! Real containerd end to end: a private containerd (own root, state and socket; never the
//! system one) with Strata as its `[proxy_plugins]` snapshotter imports a locally built OCI
//! image, runs it with runc, and drives snapshots through `ctr`; afterwards nothing is left.

use std::path::Path;
use std::process::{Child, Command};

use crate::support::{
    Server, image_archive, ok, require_command, require_root, run, scratch, wait_for,
};

struct Containerd(Child);

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn ctr(d: &Path) -> Command {
    let mut c = Command::new("ctr");
    // A namespace per test: runc keeps its state under it, and the tests run in parallel.
    let ns = format!(
        "strata-e2e-{}",
        d.file_name().unwrap().to_string_lossy().replace('.', "-")
    );
    c.arg("--address")
        .arg(d.join("ctrd.sock"))
        .args(["-n", &ns]);
    c
}

#[test]
fn containerd_uses_strata_as_a_proxy_snapshotter() {
    end_to_end("overlay");
}

/// The same with `--mode fuse`: every union is Strata's own FUSE mount, handed to containerd
/// (and runc) as a bind mount.
#[test]
fn containerd_uses_strata_in_fuse_mode() {
    end_to_end("fuse");
}

fn end_to_end(mode: &str) {
    require_root();
    for c in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
        require_command(c);
    }
    let t = scratch();
    let d = t.path();
    let archive = image_archive(d, "image.tar");

    let server = Server::start_with(&d.join("strata"), &d.join("strata.sock"), &["--mode", mode]);
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{d}/ctrd/root\"\nstate = \"{d}/ctrd/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/ctrd.sock\"\n[ttrpc]\n  address = \"{d}/ctrd.sock.ttrpc\"\n\
             [proxy_plugins]\n  [proxy_plugins.strata]\n    type = \"snapshot\"\n    address = \"{d}/strata.sock\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("containerd.log")).unwrap();
    let ctrd = Containerd(
        Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(&d.join("ctrd.sock"), "containerd");

    let out = ok(ctr(d)
        .args([
            "image",
            "import",
            "--snapshotter",
            "strata",
            "--base-name",
            "localhost/strata-e2e",
        ])
        .arg(&archive));
    assert!(
        out.contains("unpacking localhost/strata-e2e:latest"),
        "{out}"
    );
    // A container reads a file of the lower layer and does not see the one the upper deleted.
    let out = ok(ctr(d).args(["run", "--snapshotter", "strata", "--rm", "localhost/strata-e2e:latest", "c1", "/bin/sh", "-c", "cat /etc/from-lower; test ! -e /etc/to-delete && echo deleted-is-gone; cat /etc/upper-file"]));
    assert_eq!(
        out,
        "from the lower layer\ndeleted-is-gone\nfrom the upper layer\n"
    );

    // Snapshots through ctr: the image's two committed layers, then prepare/mount/commit/diff/rm.
    let snaps = |d: &Path| ok(ctr(d).args(["snapshots", "--snapshotter", "strata", "ls"]));
    let listing = snaps(d);
    let committed: Vec<(String, String)> = listing
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                if f.len() == 3 {
                    f[1].to_string()
                } else {
                    String::new()
                },
            )
        })
        .collect();
    assert_eq!(committed.len(), 2, "{listing}");
    let top = committed
        .iter()
        .find(|(k, _)| !committed.iter().any(|(_, p)| p == k))
        .unwrap()
        .0
        .clone();
    let s = |args: &[&str]| {
        let mut c = ctr(d);
        c.args(["snapshots", "--snapshotter", "strata"]).args(args);
        c
    };
    ok(&mut s(&["prepare", "e2e-active", &top]));
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount_cmd = ok(&mut s(&["mounts", mnt.to_str().unwrap(), "e2e-active"]));
    if mode == "fuse" {
        assert!(
            mount_cmd.contains("-t bind") && mount_cmd.contains("/merged"),
            "{mount_cmd}"
        );
    } else {
        assert!(
            mount_cmd.contains("lowerdir=") && mount_cmd.contains("index=off"),
            "{mount_cmd}"
        );
    }
    ok(Command::new("sh").arg("-c").arg(&mount_cmd));
    std::fs::write(mnt.join("etc/new-in-active"), "changed\n").unwrap();
    std::fs::remove_file(mnt.join("etc/from-lower")).unwrap();
    ok(Command::new("umount").arg(&mnt));
    ok(&mut s(&["commit", "e2e-committed", "e2e-active"]));
    let diff = run(&mut s(&["diff", "e2e-committed"]));
    assert!(
        diff.status.success() && diff.stdout.starts_with(&[0x1f, 0x8b]),
        "ctr snapshots diff gives a gzip layer"
    );
    let mut gz = flate2::read::GzDecoder::new(&diff.stdout[..]);
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut gz, &mut tar).unwrap();
    let names = String::from_utf8_lossy(&tar);
    assert!(
        names.contains("etc/new-in-active") && names.contains("etc/.wh.from-lower"),
        "the diff holds the change"
    );
    let usage = ok(&mut s(&["usage", "e2e-committed"]));
    assert!(usage.contains("e2e-committed"), "{usage}");
    ok(&mut s(&["rm", "e2e-committed"]));

    // Removing the image lets containerd's GC remove every snapshot; Strata deletes the dirs.
    ok(ctr(d).args(["image", "rm", "--sync", "localhost/strata-e2e:latest"]));
    let left = snaps(d);
    assert_eq!(left.lines().count(), 1, "snapshots left after GC:\n{left}");
    drop(ctrd);
    // While it runs, the server keeps a few empty dirs ready for Prepare (numbered, no record).
    let snapdir = d.join("strata/snapshots");
    let entries = |ready_too: bool| -> Vec<String> {
        std::fs::read_dir(&snapdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| ready_too || !strata_snapshotter::store::is_ready_dir(&snapdir.join(n)))
            .collect()
    };
    for _ in 0..100 {
        if entries(false).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        entries(false),
        Vec::<String>::new(),
        "directories left in {}",
        snapdir.display()
    );
    let socket = server.socket.clone();
    let status = server.stop();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status:?}");
    assert!(!socket.exists(), "socket removed");
    assert_eq!(
        entries(true),
        Vec::<String>::new(),
        "a stopped server leaves nothing"
    );
    let left: Vec<_> = strata_overlay::mount::mounts_below(d).unwrap();
    assert!(left.is_empty(), "mounts left: {left:?}");
}
