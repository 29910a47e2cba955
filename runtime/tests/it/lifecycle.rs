//! Detached containers through the real binary: the state outlives the CLI, and create,
//! start, stop, restart, kill, wait, logs, exec, inspect and rm behave as Docker's do,
//! failure paths included.

use std::time::{Duration, Instant};

use crate::support::{eventually, fails, loaded, ok, require_root, run, scratch, st};

const IMG: &str = "localhost/img:latest";

fn status(root: &std::path::Path, name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ok(st(root).args(["inspect", "--type", "container", name]))).unwrap();
    v[0]["State"]["Status"].as_str().unwrap().to_string()
}

#[test]
fn detached_lifecycle() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    // run -d prints the full id and returns once the container runs.
    let id = ok(st(&root).args([
        "run",
        "-d",
        "--name",
        "web",
        "-e",
        "WHO=world",
        IMG,
        "/bin/sh",
        "-c",
        "echo hello $WHO; echo oops >&2; exec sleep 300",
    ]))
    .trim()
    .to_string();
    assert_eq!(id.len(), 64, "{id}");
    assert_eq!(status(&root, "web"), "running");
    let ps = ok(st(&root).arg("ps"));
    assert!(ps.contains("web") && ps.contains("Up "), "{ps}");
    assert_eq!(ok(st(&root).args(["ps", "-q"])).trim(), &id[..12]);
    // Logs keep the two streams apart.
    eventually("the log has both lines", || {
        let o = run(st(&root).args(["logs", "web"]));
        String::from_utf8_lossy(&o.stdout) == "hello world\n"
            && String::from_utf8_lossy(&o.stderr) == "oops\n"
    });
    let stamped = ok(st(&root).args(["logs", "-t", "--tail", "2", "web"]));
    assert!(
        stamped.starts_with("20") && stamped.ends_with(" hello world\n"),
        "{stamped}"
    );
    // exec joins the container: its pid namespace, env, hostname; exit codes pass through.
    let out = ok(st(&root).args([
        "exec",
        "-e",
        "X=1",
        "web",
        "/bin/sh",
        "-c",
        "echo $$ $X $WHO; cat /proc/1/cmdline | tr '\\0' ' '",
    ]));
    let mut lines = out.lines();
    let first = lines.next().unwrap();
    assert!(first.ends_with(" 1 world"), "{out}");
    assert_ne!(first.split(' ').next(), Some("1"), "exec is not pid 1");
    assert_eq!(lines.next(), Some("sleep 300 "), "{out}");
    assert_eq!(
        run(st(&root).args(["exec", "web", "/bin/sh", "-c", "exit 7"]))
            .status
            .code(),
        Some(7)
    );
    assert_eq!(
        run(st(&root).args(["exec", "web", "/no/such"]))
            .status
            .code(),
        Some(127)
    );
    // Removing a running container needs -f; a name is taken while it exists.
    fails(st(&root).args(["rm", "web"]), "container is running");
    fails(
        st(&root).args(["run", "-d", "--name", "web", IMG, "true"]),
        "already in use",
    );
    // stop: pid 1 ignores SIGTERM (no handler), so SIGKILL after the grace period.
    let t0 = Instant::now();
    assert_eq!(ok(st(&root).args(["stop", "-t", "1", "web"])), "web\n");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "stop waited the grace period"
    );
    assert_eq!(status(&root, "web"), "exited");
    assert_eq!(ok(st(&root).args(["wait", "web"])), "137\n");
    assert!(ok(st(&root).args(["ps", "-a"])).contains("Exited (137)"));
    fails(st(&root).args(["exec", "web", "true"]), "is not running");
    fails(st(&root).args(["kill", "web"]), "is not running");
    // start runs the same container again, on the same writable layer.
    ok(st(&root).args(["start", "web"]));
    assert_eq!(status(&root, "web"), "running");
    eventually("the second run logged", || {
        ok(st(&root).args(["logs", "web"])) == "hello world\nhello world\n"
    });
    // A process with a handler stops at SIGTERM at once; kill -s takes names and numbers.
    fails(
        st(&root).args(["kill", "-s", "NOPE", "web"]),
        "invalid signal",
    );
    ok(st(&root).args(["kill", "-s", "9", "web"]));
    assert_eq!(ok(st(&root).args(["wait", "web"])), "137\n");
    ok(st(&root).args(["rm", "web"]));
    fails(st(&root).args(["logs", "web"]), "no such container");

    // A handled SIGTERM ends the container without waiting for the grace period.
    ok(st(&root).args([
        "run",
        "-d",
        "--name",
        "polite",
        IMG,
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.1; done",
    ]));
    let t0 = Instant::now();
    ok(st(&root).args(["stop", "-t", "30", "polite"]));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(ok(st(&root).args(["wait", "polite"])), "0\n");
    ok(st(&root).args(["rm", "polite"]));

    // create + start -a: the output and the exit code come back.
    let id = ok(st(&root).args([
        "create",
        "--name",
        "later",
        IMG,
        "/bin/sh",
        "-c",
        "echo made; exit 4",
    ]));
    assert_eq!(status(&root, "later"), "created");
    assert!(ok(st(&root).args(["ps", "-a"])).contains("Created"));
    let out = run(st(&root).args(["start", "-a", id.trim()]));
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(4), "made\n")
    );
    // rm -f of a running container kills it first; --rm containers go by themselves.
    ok(st(&root).args(["run", "-d", "--name", "gone", IMG, "sleep", "300"]));
    ok(st(&root).args(["rm", "-f", "gone", "later"]));
    ok(st(&root).args(["run", "-d", "--rm", "--name", "auto", IMG, "true"]));
    eventually("the --rm container removed itself", || {
        ok(st(&root).args(["ps", "-aq"])).is_empty()
    });
    // Start-up failures are reported by the CLI, not lost in the monitor.
    fails(st(&root).args(["run", "-d", IMG, "/no/such/binary"]), "");
    fails(
        st(&root).args(["run", "-d", "nosuch:image", "true"]),
        "no such image",
    );
    fails(
        st(&root).args(["run", "--network", "bridge2", IMG, "true"]),
        "network",
    );
}

#[test]
fn terminals_and_stdin() {
    require_root();
    crate::support::require_command("script");
    let t = scratch();
    let root = loaded(t.path());
    let strata = env!("CARGO_BIN_EXE_strata");
    // -it under a pseudo-terminal (script(1) provides one): the container gets a terminal of
    // its own devpts, named inside it.
    let cmd = format!(
        "{strata} --root {} run --rm -it {IMG} /bin/sh -c 'tty; exit 3'",
        root.display()
    );
    let out = run(std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/pts/0"),
        "{out:?}"
    );
    // -i without -t: stdin flows in.
    let mut child = st(&root)
        .args([
            "run",
            "--rm",
            "-i",
            IMG,
            "/bin/sh",
            "-c",
            "read x; echo got $x",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"line\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got line\n");
    // Without -i, stdin is empty.
    let out = ok(st(&root).args(["run", "--rm", IMG, "/bin/sh", "-c", "cat; echo end"]));
    assert_eq!(out, "end\n");
    // exec -t in a running container.
    ok(st(&root).args(["run", "-d", "--name", "box", IMG, "sleep", "300"]));
    let cmd = format!(
        "{strata} --root {} exec -it box /bin/sh -c 'tty; exit 5'",
        root.display()
    );
    let out = run(std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    assert_eq!(out.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/pts/"),
        "{out:?}"
    );
    // -it without a terminal is refused, as Docker does.
    fails(st(&root).args(["run", "-it", IMG, "true"]), "not a TTY");
    ok(st(&root).args(["rm", "-f", "box"]));
}

#[test]
fn state_survives_a_killed_monitor() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    ok(st(&root).args(["run", "-d", "--name", "c", IMG, "sleep", "300"]));
    let v: serde_json::Value = serde_json::from_str(&ok(st(&root).args(["inspect", "c"]))).unwrap();
    let pid = v[0]["State"]["Pid"].as_i64().unwrap();
    assert!(pid > 0);
    // Kill the container's process behind strata's back: the monitor records the exit.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(ok(st(&root).args(["wait", "c"])), "137\n");
    assert_eq!(status(&root, "c"), "exited");
    ok(st(&root).args(["rm", "c"]));
}

#[test]
fn logs_follow_and_image_volumes() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    // logs -f prints as the container writes and returns when it exits.
    ok(st(&root).args([
        "run",
        "-d",
        "--name",
        "talker",
        IMG,
        "/bin/sh",
        "-c",
        "for i in 1 2 3; do echo line $i; sleep 0.2; done",
    ]));
    let t0 = Instant::now();
    let out = ok(st(&root).args(["logs", "-f", "talker"]));
    assert_eq!(out, "line 1\nline 2\nline 3\n");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "followed until the end"
    );
    assert_eq!(
        ok(st(&root).args(["logs", "--tail", "1", "talker"])),
        "line 3\n"
    );
    ok(st(&root).args(["rm", "talker"]));
    // An image's declared Volumes become anonymous volumes, pre-filled from the image.
    let layout = t.path().join("layout");
    let image = format!("{}:latest", layout.display());
    ok(std::process::Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.volume",
        "/etc",
    ]));
    let archive = t.path().join("vol.tar");
    ok(std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    let root2 = t.path().join("root2");
    ok(st(&root2).arg("load").arg("-i").arg(&archive));
    ok(st(&root2).args([
        "run",
        "--name",
        "v",
        "localhost/vol:latest",
        "/bin/sh",
        "-c",
        "cat /etc/from-lower; grep -c ' /etc ' /proc/mounts",
    ]));
    assert_eq!(
        ok(st(&root2).args(["logs", "v"])),
        "from the lower layer\n1\n"
    );
    let mounts = serde_json::from_str::<serde_json::Value>(&ok(st(&root2).args(["inspect", "v"])))
        .unwrap()[0]["Mounts"]
        .clone();
    assert_eq!(mounts[0]["Destination"], "/etc");
    assert_eq!(
        ok(st(&root2).args(["volume", "ls", "-q"])).lines().count(),
        1
    );
    ok(st(&root2).args(["rm", "-v", "v"]));
    assert_eq!(
        ok(st(&root2).args(["volume", "ls", "-q"])),
        "",
        "rm -v took the anonymous volume"
    );
}
