//! Pull and push against a real registry: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 with a private config and storage dir, and skopeo as a second client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{fails, loaded, ok, require_command, require_root, scratch, st};

/// A `docker-registry serve` on a free loopback port, killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let auth = htpasswd
            .map(|p| {
                format!(
                    "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                    p.display()
                )
            })
            .unwrap_or_default();
        Self::start_with_auth(dir, &auth)
    }

    /// A registry with `auth` (a YAML `auth:` section) as its config says.
    pub fn start_with_auth(dir: &Path, auth: &str) -> Registry {
        require_command("docker-registry");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let storage = dir.join(format!("registry-{port}"));
        let config = dir.join(format!("registry-{port}.yml"));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
        }
    }

    pub fn name(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    /// The registry's file holding blob `digest` (`sha256:...`).
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `strata --root ROOT` with a private credentials file.
fn sr(root: &Path, dir: &Path) -> Command {
    let mut c = st(root);
    c.env("STRATA_AUTH_FILE", dir.join("auth.json"));
    c
}

/// `strata login -u USER --password-stdin SERVER` with `pass` on stdin.
fn login(root: &Path, dir: &Path, server: &str, user: &str, pass: &str) -> std::process::Output {
    let mut child = sr(root, dir)
        .args(["login", "-u", user, "--password-stdin", server])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{pass}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn skopeo_digest(reference: &str) -> String {
    require_command("skopeo");
    let out = ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

/// Everything under `root` but the SQLite files, with sizes: what a failed pull must not change.
fn tree(root: &Path) -> Vec<String> {
    fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            if rel.ends_with(".db-wal") || rel.ends_with(".db-shm") || rel.ends_with("features") {
                continue;
            }
            let m = std::fs::symlink_metadata(&path).unwrap();
            out.push(format!("{rel} {}", if m.is_dir() { 0 } else { m.len() }));
            if m.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// [`fails`], but a pull that has not ended after a minute is a hang: killed, and the test fails.
/// (A failed layer used to stop the others with an error readers retry forever.)
fn fails_within(cmd: &mut Command, needle: &str) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{cmd:?} hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains(needle),
        "{cmd:?}: expected a failure mentioning {needle:?}:\n{err}"
    );
    err
}

#[test]
fn push_then_pull_into_a_fresh_store_runs_and_digests_agree() {
    require_root();
    let t = scratch();
    let reg = Registry::start(t.path(), None);
    let src = loaded(t.path());
    let first = reg.name("team/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &first]));
    let out = ok(sr(&src, t.path()).args(["push", &first]));
    assert!(out.contains("3 blobs pushed"), "{out}");
    let digest = ok(sr(&src, t.path()).args(["push", "-q", &first]));
    let digest = digest.trim();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(
        skopeo_digest(&first),
        digest,
        "skopeo disagrees on the digest"
    );
    // Pushing again uploads nothing; pushing under another repository mounts the blobs.
    let out = ok(sr(&src, t.path()).args(["push", &first]));
    assert!(
        out.contains("0 blobs pushed") && out.contains("3 already there"),
        "{out}"
    );
    let second = reg.name("other/copy:v2");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &second]));
    let out = ok(sr(&src, t.path()).args(["push", &second]));
    assert!(out.contains("3 mounted"), "{out}");
    // Pull under the other name into a fresh store and run it.
    let dst = t.path().join("fresh");
    let out = ok(sr(&dst, t.path()).args(["pull", &second]));
    assert!(out.contains(&format!("Digest: {digest}")), "{out}");
    assert!(out.contains("Downloaded newer image"), "{out}");
    let inspect = ok(sr(&dst, t.path()).args(["inspect", &second]));
    assert!(inspect.contains(digest), "{inspect}");
    let out = ok(sr(&dst, t.path()).args([
        "run",
        "--rm",
        &second,
        "sh",
        "-c",
        "cat /etc/from-lower /etc/upper-file; test ! -e /etc/to-delete && echo deleted-is-gone",
    ]));
    assert_eq!(
        out,
        "from the lower layer\nfrom the upper layer\ndeleted-is-gone\n"
    );
    // The same image pulled again is up to date; saving it works (the blobs were kept).
    let out = ok(sr(&dst, t.path()).args(["pull", &second]));
    assert!(out.contains("Image is up to date"), "{out}");
    ok(sr(&dst, t.path())
        .args(["save", "-o"])
        .arg(t.path().join("saved.tar"))
        .arg(&second));
    // Pulled by digest too.
    let by_digest = format!("{}@{digest}", reg.name("team/img"));
    let out = ok(sr(&t.path().join("third"), t.path()).args(["pull", &by_digest]));
    assert!(out.contains(digest), "{out}");
}

#[test]
fn basic_auth_rejects_without_login_and_accepts_after() {
    require_root();
    require_command("htpasswd");
    let t = scratch();
    let pw = t.path().join("htpasswd");
    let out = ok(Command::new("htpasswd").args(["-Bbn", "alice", "s3cret"]));
    std::fs::write(&pw, out).unwrap();
    let reg = Registry::start(t.path(), Some(&pw));
    let src = loaded(t.path());
    let name = reg.name("private/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &name]));
    fails(
        sr(&src, t.path()).args(["push", &name]),
        "authentication required",
    );
    let login = |pass: &str| login(&src, t.path(), &reg.name(""), "alice", pass);
    let bad = login("wrong");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("wrong user name or password"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(
        !t.path().join("auth.json").exists(),
        "a refused login stored credentials"
    );
    let good = login("s3cret");
    assert!(good.status.success(), "{good:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(t.path().join("auth.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "credentials readable by others");
    ok(sr(&src, t.path()).args(["push", &name]));
    let dst = t.path().join("fresh");
    ok(sr(&dst, t.path()).args(["pull", &name]));
    ok(sr(&dst, t.path()).args(["logout", &reg.name("")]));
    fails(
        sr(&t.path().join("other"), t.path()).args(["pull", &name]),
        "authentication required",
    );
}

#[test]
fn a_corrupt_or_missing_blob_leaves_the_store_as_it_was() {
    require_root();
    let t = scratch();
    let reg = Registry::start(t.path(), None);
    let src = loaded(t.path());
    let name = reg.name("bad/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &name]));
    ok(sr(&src, t.path()).args(["push", &name]));
    // A fresh store that already holds something, so "as it was" is not just "empty".
    let dst = t.path().join("dst");
    ok(sr(&dst, t.path())
        .args(["load", "-i"])
        .arg(t.path().join("img.tar")));
    ok(sr(&dst, t.path()).args(["rmi", "localhost/img:latest"]));
    ok(sr(&dst, t.path()).args(["images"]));
    let before = tree(&dst);
    let inspect = ok(sr(&src, t.path()).args(["inspect", &name]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    let manifest_digest = v["RepoDigests"][0]
        .as_str()
        .unwrap()
        .split('@')
        .nth(1)
        .unwrap()
        .to_string();
    let manifest = std::fs::read(reg.blob_file(&manifest_digest)).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let top = m["layers"][1]["digest"].as_str().unwrap().to_string();
    // Flip bytes in the middle of the top layer's blob: same size, wrong digest.
    let f = reg.blob_file(&top);
    let mut data = std::fs::read(&f).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&f, &data).unwrap();
    let err = fails_within(sr(&dst, t.path()).args(["pull", &name]), "pulling");
    assert!(
        err.contains("digest") || err.contains("corrupt") || err.contains("invalid"),
        "{err}"
    );
    assert_eq!(tree(&dst), before, "a failed pull changed the store");
    // A blob the registry lost: same answer.
    std::fs::remove_file(&f).unwrap();
    fails_within(sr(&dst, t.path()).args(["pull", &name]), "pulling");
    assert_eq!(tree(&dst), before, "a failed pull changed the store");
    assert!(
        ok(sr(&dst, t.path()).args(["images", "-q"]))
            .trim()
            .is_empty(),
        "a failed pull recorded an image"
    );
}

#[test]
fn an_index_gives_the_host_platform_and_names_the_others() {
    require_root();
    require_command("curl");
    let t = scratch();
    let reg = Registry::start(t.path(), None);
    let src = loaded(t.path());
    let name = reg.name("multi/img:single");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &name]));
    let digest = ok(sr(&src, t.path()).args(["push", "-q", &name]));
    let digest = digest.trim();
    let size = std::fs::metadata(reg.blob_file(digest)).unwrap().len();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
              "size": size, "platform": { "os": "linux", "architecture": "riscv64" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
              "size": size, "platform": { "os": "linux", "architecture": arch } },
        ]
    });
    let body = t.path().join("index.json");
    std::fs::write(&body, serde_json::to_vec(&index).unwrap()).unwrap();
    let put = ok(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args([
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!(
            "http://127.0.0.1:{}/v2/multi/img/manifests/multi",
            reg.port
        )));
    assert_eq!(put, "201", "the registry refused the index");
    let dst = t.path().join("dst");
    let multi = reg.name("multi/img:multi");
    let out = ok(sr(&dst, t.path()).args(["pull", &multi]));
    let index_digest = skopeo_digest(&multi);
    assert!(
        out.contains(&format!("Digest: {index_digest}")),
        "the index's digest is the one reported: {out}"
    );
    let inspect = ok(sr(&dst, t.path()).args(["inspect", &multi]));
    assert!(inspect.contains(digest), "the platform manifest: {inspect}");
    let err = fails(
        sr(&dst, t.path()).args(["pull", "--platform", "linux/s390x", &multi]),
        "no image for linux/s390x",
    );
    assert!(
        err.contains(&format!("linux/riscv64, linux/{arch}")),
        "{err}"
    );
}

#[test]
fn a_killed_pull_is_swept_and_the_next_one_succeeds() {
    require_root();
    let t = scratch();
    let reg = Registry::start(t.path(), None);
    // An image with a layer big enough for the pull to be caught midway.
    let src = loaded(t.path());
    let big = t.path().join("big.tar");
    let rootfs = t.path().join("bigroot");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..8 {
        let mut buf = vec![0u8; 8 << 20];
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(rootfs.join(format!("data/{i}")), buf).unwrap();
    }
    ok(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&big)
        .arg("."));
    ok(sr(&src, t.path())
        .arg("import")
        .arg(&big)
        .arg("localhost/big:v1"));
    let name = reg.name("big/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/big:v1", &name]));
    ok(sr(&src, t.path()).args(["push", &name]));
    let dst = t.path().join("dst");
    ok(sr(&dst, t.path()).args(["images"]));
    for delay_ms in [30u64, 120, 400] {
        let mut child = sr(&dst, t.path())
            .args(["pull", "-q", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever it left, the next command that opens the snapshot store sweeps it, and a
        // new pull succeeds.
        let out = ok(sr(&dst, t.path()).args(["pull", &name]));
        assert!(out.contains("Digest:"), "{out}");
        let ingest: Vec<_> = std::fs::read_dir(dst.join("content/ingest"))
            .unwrap()
            .collect();
        assert!(ingest.is_empty(), "ingest files left: {ingest:?}");
        let snaps: Vec<String> = std::fs::read_dir(dst.join("snapshotter/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert_eq!(snaps.len(), 1, "one layer, one snapshot: {snaps:?}");
        ok(sr(&dst, t.path()).args(["rmi", &name]));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills a child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bearer tokens, as Docker Hub does it: docker-registry with `auth: token`, and a token server
/// (tests/fixtures/token_server.py, RS256 JWTs signed by openssl) that grants what it is asked
/// to a user with the right password and nothing to anonymous requests.
#[test]
fn bearer_tokens_from_a_token_server() {
    require_root();
    require_command("openssl");
    require_command("python3");
    let t = scratch();
    let (key, cert) = (t.path().join("key.pem"), t.path().join("cert.pem"));
    ok(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=strata-token",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let tport = free_port();
    let server = Killed(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/token_server.py"
            ))
            .arg(tport.to_string())
            .arg(&key)
            .arg(&cert)
            .args(["strata-issuer", "bob", "pw"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tport)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the token server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reg = Registry::start_with_auth(
        t.path(),
        &format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: strata-test\n    issuer: strata-issuer\n    rootcertbundle: {}\n",
            cert.display()
        ),
    );
    let src = loaded(t.path());
    let name = reg.name("tok/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &name]));
    // Anonymous: the token grants nothing, the registry refuses.
    fails(sr(&src, t.path()).args(["push", &name]), "401");
    let login = |pass: &str| login(&src, t.path(), &reg.name(""), "bob", pass);
    let bad = login("nope");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("token server"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(login("pw").status.success());
    let digest = ok(sr(&src, t.path()).args(["push", "-q", &name]));
    let out = ok(sr(&t.path().join("fresh"), t.path()).args(["pull", &name]));
    assert!(out.contains(&format!("Digest: {}", digest.trim())), "{out}");
    drop(server);
}

/// HTTPS: docker-registry with a TLS certificate and basic auth. A loopback registry is
/// insecure by default (as in Docker), so the certificate is not verified, but everything goes
/// over TLS: the client speaks HTTPS first and keeps to it.
#[test]
fn https_with_basic_auth() {
    require_root();
    require_command("openssl");
    require_command("htpasswd");
    let t = scratch();
    let (key, cert) = (t.path().join("tls.key"), t.path().join("tls.crt"));
    ok(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let pw = t.path().join("htpasswd");
    std::fs::write(
        &pw,
        ok(Command::new("htpasswd").args(["-Bbn", "carol", "tls-pw"])),
    )
    .unwrap();
    let reg = Registry::start_with_auth(
        t.path(),
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
            cert.display(),
            key.display(),
            pw.display()
        ),
    );
    // Plain HTTP is refused by a TLS registry: the answer must have come over TLS.
    let plain = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/v2/", reg.name("").trim_end_matches('/')))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "400",
        "the registry is not on TLS"
    );
    let src = loaded(t.path());
    let name = reg.name("secure/img:v1");
    ok(sr(&src, t.path()).args(["tag", "localhost/img:latest", &name]));
    let out = login(&src, t.path(), &reg.name(""), "carol", "tls-pw");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = ok(sr(&src, t.path()).args(["push", "-q", &name]));
    let out = ok(sr(&t.path().join("fresh"), t.path()).args(["pull", &name]));
    assert!(out.contains(digest.trim()), "{out}");
}
