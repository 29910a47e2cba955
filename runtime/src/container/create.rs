//! `strata create` (and the first half of `run`): a container record and its writable
//! snapshot, from an image and the options Docker's `run` takes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Container, find, new_state, write_json};
use crate::image::Images;
use crate::{Error, Result, volume};

/// What `strata create`/`run` was asked for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Image reference or ID.
    pub image: String,
    /// Command and arguments (replacing the image's Cmd).
    pub cmd: Vec<String>,
    /// Container name.
    pub name: Option<String>,
    /// Remove the container when it exits.
    pub rm: bool,
    /// `KEY=VALUE` (or `KEY`, taken from this environment).
    pub env: Vec<String>,
    /// Files of `KEY=VALUE` lines.
    pub env_file: Vec<PathBuf>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Entrypoint override (`""` clears the image's).
    pub entrypoint: Option<String>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// `uid[:gid]` or a user name from the image's /etc/passwd.
    pub user: Option<String>,
    /// `-v` specs: `NAME:/path[:ro]`, `/host:/path[:ro]`, `/path`.
    pub volumes: Vec<String>,
    /// `--mount` specs: `type=volume|bind|tmpfs,source=..,target=..[,readonly]`.
    pub mounts: Vec<String>,
    /// `--tmpfs` specs: `/path[:options]`.
    pub tmpfs: Vec<String>,
    /// Keep stdin open (`-i`).
    pub interactive: bool,
    /// Allocate a pseudo-terminal (`-t`).
    pub tty: bool,
    /// `--network`: `none`/`bridge` (loopback only, the default) or `host`.
    pub network: Option<String>,
}

pub(crate) fn random_id() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("read", "/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Docker's rule for container and volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub(crate) fn is_docker_name(name: &str) -> bool {
    name.as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_name(name: &str) -> Result<()> {
    if is_docker_name(name) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid container name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// A mount asked for with `-v`, `--mount`, `--tmpfs` or by the image's `Volumes`.
#[derive(Debug, Clone, PartialEq)]
struct MountSpec {
    kind: &'static str,
    /// Volume name (`None` for an anonymous volume) or host path.
    source: Option<String>,
    target: String,
    read_only: bool,
    no_copy: bool,
    /// tmpfs mount options.
    options: String,
}

fn check_target(t: &str, spec: &str) -> Result<String> {
    if !t.starts_with('/') {
        return Err(Error::Invalid(format!(
            "invalid mount {spec:?}: the container path {t:?} must be absolute"
        )));
    }
    let clean = normalize(t);
    if clean == "/" {
        return Err(Error::Invalid(format!(
            "invalid mount {spec:?}: the container path cannot be /"
        )));
    }
    Ok(clean)
}

/// `/a//b/./c/` -> `/a/b/c`; `..` is refused by the caller's resolution anyway.
fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// `-v SRC:DST[:OPTS]` or `-v DST`.
fn parse_volume(spec: &str) -> Result<MountSpec> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (src, dst, opts) = match parts.as_slice() {
        [dst] => (None, *dst, ""),
        [src, dst] => (Some(*src), *dst, ""),
        [src, dst, opts] => (Some(*src), *dst, *opts),
        _ => {
            return Err(Error::Invalid(format!(
                "invalid volume spec {spec:?}: expected [SOURCE:]TARGET[:OPTIONS]"
            )));
        }
    };
    let target = check_target(dst, spec)?;
    let mut m = MountSpec {
        kind: "volume",
        source: None,
        target,
        read_only: false,
        no_copy: false,
        options: String::new(),
    };
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => m.read_only = true,
            "rw" => m.read_only = false,
            "nocopy" => m.no_copy = true,
            // SELinux relabelling and propagation modes have no meaning here.
            "z" | "Z" | "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
            | "delegated" | "cached" | "consistent" => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "invalid volume spec {spec:?}: unknown option {o:?}"
                )));
            }
        }
    }
    match src {
        None => {}
        Some(s) if s.starts_with('/') => {
            m.kind = "bind";
            m.source = Some(normalize(s));
        }
        Some(s) => {
            volume::check_name(s)?;
            m.source = Some(s.into());
        }
    }
    Ok(m)
}

/// `--mount type=..,source=..,target=..,readonly,...`
fn parse_mount(spec: &str) -> Result<MountSpec> {
    let bad = |why: String| Error::Invalid(format!("invalid --mount {spec:?}: {why}"));
    let mut kind = "volume";
    let (mut source, mut target) = (None, None);
    let (mut read_only, mut no_copy) = (false, false);
    let mut options = Vec::new();
    for field in spec.split(',') {
        let (k, v) = field
            .split_once('=')
            .map_or((field, None), |(k, v)| (k, Some(v)));
        let flag = |v: Option<&str>| -> Result<bool> {
            match v {
                None | Some("true" | "1") => Ok(true),
                Some("false" | "0") => Ok(false),
                Some(x) => Err(bad(format!("{k}={x}: expected true or false"))),
            }
        };
        match k {
            "type" => {
                kind = match v {
                    Some("volume") => "volume",
                    Some("bind") => "bind",
                    Some("tmpfs") => "tmpfs",
                    other => return Err(bad(format!("unknown type {other:?}"))),
                }
            }
            "source" | "src" => source = v.map(String::from),
            "target" | "dst" | "destination" => target = v.map(String::from),
            "readonly" | "ro" => read_only = flag(v)?,
            "volume-nocopy" => no_copy = flag(v)?,
            "tmpfs-size" => options.push(format!("size={}", v.unwrap_or_default())),
            "tmpfs-mode" => options.push(format!("mode={}", v.unwrap_or_default())),
            "bind-propagation" | "consistency" => {}
            _ => return Err(bad(format!("unknown field {k:?}"))),
        }
    }
    let target = check_target(
        &target.ok_or_else(|| bad("target is required".into()))?,
        spec,
    )?;
    let source = match (kind, source) {
        ("bind", None) => return Err(bad("a bind mount needs a source".into())),
        ("bind", Some(s)) if !s.starts_with('/') => {
            return Err(bad(format!("bind source {s:?} must be an absolute path")));
        }
        ("bind", Some(s)) => {
            if !Path::new(&s).exists() {
                return Err(bad(format!("bind source path does not exist: {s}")));
            }
            Some(normalize(&s))
        }
        ("tmpfs", Some(_)) => return Err(bad("a tmpfs mount takes no source".into())),
        ("volume", Some(s)) => {
            volume::check_name(&s)?;
            Some(s)
        }
        (_, s) => s,
    };
    Ok(MountSpec {
        kind,
        source,
        target,
        read_only,
        no_copy,
        options: options.join(","),
    })
}

/// `--tmpfs /path[:options]`
fn parse_tmpfs(spec: &str) -> Result<MountSpec> {
    let (t, o) = spec.split_once(':').unwrap_or((spec, ""));
    Ok(MountSpec {
        kind: "tmpfs",
        source: None,
        target: check_target(t, spec)?,
        read_only: false,
        no_copy: false,
        options: o.to_string(),
    })
}

fn read_env_file(p: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io("read env file", p, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line
            .split('=')
            .next()
            .is_none_or(|k| k.is_empty() || k.contains(char::is_whitespace))
        {
            return Err(Error::Invalid(format!(
                "{}:{}: invalid variable {line:?}",
                p.display(),
                n + 1
            )));
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Creates a container (status "created"): validates everything first, then makes the
/// volumes it names, its directory and its writable snapshot. On error nothing is left.
pub fn create(images: &mut Images, root: &Path, o: &RunOptions) -> Result<Container> {
    let img = images.store.resolve(&o.image)?;
    let parsed = images.parse(&img)?;
    let chains = Images::chains(&parsed)?;
    let top = chains
        .last()
        .ok_or_else(|| Error::Invalid(format!("image {} has no layers", o.image)))?
        .to_string();
    if let Some(name) = &o.name {
        check_name(name)?;
        if let Ok(c) = find(root, name) {
            if c.name() == *name {
                return Err(Error::Conflict(format!(
                    "the container name \"/{name}\" is already in use by container {}: remove that container or pick another name",
                    c.id
                )));
            }
        }
    }
    let network = match o.network.as_deref() {
        None | Some("bridge" | "none" | "default") => "none",
        Some("host") => "host",
        Some(n) => {
            return Err(Error::Invalid(format!(
                "network {n:?} not found: strata has loopback only (none) or --network host"
            )));
        }
    };
    let cfg = parsed.config.config().clone().unwrap_or_default();
    let entrypoint: Vec<String> = match &o.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => cfg.entrypoint().clone().unwrap_or_default(),
    };
    let cmd: Vec<String> = if !o.cmd.is_empty() {
        o.cmd.clone()
    } else if o.entrypoint.is_some() {
        Vec::new()
    } else {
        cfg.cmd().clone().unwrap_or_default()
    };
    let args: Vec<String> = entrypoint
        .iter()
        .cloned()
        .chain(cmd.iter().cloned())
        .collect();
    if args.is_empty() {
        return Err(Error::Invalid(
            "no command specified: the image has neither Entrypoint nor Cmd".into(),
        ));
    }
    let mut specs = Vec::new();
    for v in &o.volumes {
        specs.push(parse_volume(v)?);
    }
    for m in &o.mounts {
        specs.push(parse_mount(m)?);
    }
    for t in &o.tmpfs {
        specs.push(parse_tmpfs(t)?);
    }
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|p| p.target == s.target) {
            return Err(Error::Invalid(format!(
                "duplicate mount point: {}",
                s.target
            )));
        }
    }
    // The image's declared volumes become anonymous volumes unless something else is there.
    let mut declared: Vec<&String> = cfg.volumes().iter().flatten().collect();
    declared.sort();
    for t in declared {
        let target = check_target(t, t)?;
        if !specs.iter().any(|s| s.target == target) {
            specs.push(MountSpec {
                kind: "volume",
                source: None,
                target,
                read_only: false,
                no_copy: false,
                options: String::new(),
            });
        }
    }
    let mut env_list: Vec<String> = cfg.env().clone().unwrap_or_default();
    for f in &o.env_file {
        env_list.extend(read_env_file(f)?);
    }
    env_list.extend(o.env.iter().cloned());

    let id = random_id()?;
    let hostname = match (&o.hostname, network) {
        (Some(h), _) => h.clone(),
        (None, "host") => nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| id[..12].to_string()),
        (None, _) => id[..12].to_string(),
    };
    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    let mut set = |k: &str, v: String| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v;
        } else {
            env.push((k.into(), v));
        }
    };
    set("HOSTNAME", hostname.clone());
    for e in env_list {
        match e.split_once('=') {
            Some((k, v)) => set(k, v.into()),
            None => {
                if let Ok(v) = std::env::var(&e) {
                    set(&e, v);
                }
            }
        }
    }
    if o.tty {
        set("TERM", "xterm".into());
    }
    let workdir = o
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !workdir.starts_with('/') {
        return Err(Error::Invalid(format!(
            "the working directory {workdir:?} is invalid: it must be absolute"
        )));
    }
    let user = o
        .user
        .clone()
        .or_else(|| cfg.user().clone().filter(|u| !u.is_empty()));

    let dir = root.join("containers").join(&id);
    let c = Container {
        id: id.clone(),
        dir: dir.clone(),
    };
    let mut made_volumes: Vec<String> = Vec::new();
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(dir.join("rootfs")).map_err(|e| Error::io("create", &dir, e))?;
        std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
            .map_err(|e| Error::io("write", dir.join("hostname"), e))?;
        std::fs::write(
            dir.join("hosts"),
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
        )
        .map_err(|e| Error::io("write", dir.join("hosts"), e))?;
        let mut binds = Vec::new();
        for s in &specs {
            let (source, name, anonymous) = match s.kind {
                "volume" => {
                    let existed = s
                        .source
                        .as_deref()
                        .is_some_and(|n| volume::get(root, n).is_ok());
                    let v = volume::create(root, s.source.as_deref(), BTreeMap::new())?;
                    if !existed {
                        made_volumes.push(v.name.clone());
                    }
                    (
                        v.data().to_string_lossy().into_owned(),
                        Some(v.name.clone()),
                        v.anonymous(),
                    )
                }
                "bind" => {
                    let src = s.source.clone().expect("bind mounts have a source");
                    if !Path::new(&src).exists() {
                        // What `docker run -v /host:/path` does for a missing host path.
                        std::fs::create_dir_all(&src)
                            .map_err(|e| Error::io("create bind source", &src, e))?;
                    }
                    (src, None, false)
                }
                _ => (String::new(), None, false),
            };
            binds.push(json!({
                "Type": s.kind, "Name": name, "Source": source, "Destination": s.target,
                "ReadOnly": s.read_only, "NoCopy": s.no_copy, "Options": s.options, "Anonymous": anonymous,
            }));
        }
        let snap = images.snapshotter()?;
        let init = init_layer(snap, &c, &top)?;
        let mounts = snap.prepare(&c.snapshot_key(), &init, Default::default())?;
        let mounts_json: Vec<_> = mounts
            .iter()
            .map(|m| json!({ "Type": m.kind, "Source": m.source, "Options": m.options }))
            .collect();
        let name = o.name.clone().unwrap_or_else(|| default_name(&id));
        let env_json: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write_json(
            &dir.join("config.json"),
            &json!({
                "Id": id, "Name": name, "Image": o.image, "ImageId": img.config.to_string(),
                "ImageTop": top, "Layers": Value::Array(Vec::new()),
                "Args": args, "Entrypoint": entrypoint, "Cmd": cmd, "Env": env_json,
                "WorkingDir": workdir, "Hostname": hostname, "User": user, "ReadOnly": o.read_only,
                "Rm": o.rm, "Tty": o.tty, "OpenStdin": o.interactive, "Network": network,
                "Mounts": mounts_json, "Binds": binds, "Created": crate::time::now(),
            }),
        )?;
        c.set_state(&new_state("created"))
    })();
    if let Err(e) = result {
        if let Ok(snap) = images.snapshotter() {
            let _ = snap.remove(&c.snapshot_key());
        }
        let _ = std::fs::remove_dir_all(&dir);
        for v in made_volumes {
            let _ = volume::remove(root, &v, true);
        }
        return Err(e);
    }
    Ok(c)
}

/// A Docker-style `adjective_name` from the id, so names are memorable but need no state.
fn default_name(id: &str) -> String {
    const ADJ: &[&str] = &[
        "brave", "calm", "eager", "fond", "gentle", "happy", "keen", "lucid", "merry", "nifty",
        "proud", "quiet", "sharp", "tender", "vivid", "wise",
    ];
    const NAMES: &[&str] = &[
        "babbage", "curie", "dijkstra", "euler", "fermat", "gauss", "hopper", "kepler", "lovelace",
        "noether", "pascal", "ritchie", "shannon", "thompson", "turing", "wozniak",
    ];
    let n = u32::from_str_radix(&id[..8], 16).unwrap_or(0) as usize;
    format!(
        "{}_{}_{}",
        ADJ[n % ADJ.len()],
        NAMES[(n / ADJ.len()) % NAMES.len()],
        &id[8..12]
    )
}

/// Docker's init layer: the mount points a container needs (`/proc`, `/sys`, `/dev`,
/// `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`) are made in a layer of their own between
/// the image and the container's writable layer, so they never show in `diff`, `commit` or
/// `ps -s`. The layer depends only on the layer below, so one per top layer (`init-<chain>`)
/// serves every container on it; it is made on first use.
///
/// It is written straight into the new snapshot's directory, without a mount (so rootless
/// works the same): only what the image lacks is created, and an `/etc` made to hold the files
/// takes the owner, mode and times of the image's, as a copy-up would.
pub(crate) fn init_layer(
    snap: &strata_snapshotter::Snapshotter,
    c: &Container,
    image_top: &str,
) -> Result<String> {
    let name = format!("init-{}", image_top.trim_start_matches("sha256:"));
    if snap.stat(&name).is_ok() {
        return Ok(name);
    }
    let key = format!("{}-init-active", c.snapshot_key());
    snap.prepare(&key, image_top, Default::default())?;
    let made = (|| -> Result<()> {
        let (upper, lowers) = snap.layer_dirs(&key)?;
        populate_init(&upper, &strata_overlay::diff::LowerView::new(lowers))?;
        match snap.commit(&name, &key, Default::default(), None) {
            // Another run made it meanwhile: use theirs.
            Err(strata_snapshotter::Error::AlreadyExists(_)) => {
                let _ = snap.remove(&key);
                Ok(())
            }
            r => r.map_err(Error::from),
        }
    })();
    if let Err(e) = made {
        let _ = snap.remove(&key);
        return Err(e);
    }
    Ok(name)
}

fn populate_init(upper: &Path, lowers: &strata_overlay::diff::LowerView) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::io("create mount point", p, e)
    };
    let kind = |st: &libc::stat| st.st_mode & libc::S_IFMT;
    for d in ["proc", "sys", "dev"] {
        if lowers.lookup(d.as_bytes())?.is_none() {
            let p = upper.join(d);
            std::fs::create_dir(&p).map_err(io(&p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(io(&p))?;
        }
    }
    let Some(etc) = lowers.lookup(b"etc")? else {
        return Ok(());
    };
    if kind(&etc.st) != libc::S_IFDIR {
        return Ok(());
    }
    let missing: Vec<&str> = ["hostname", "hosts", "resolv.conf"]
        .into_iter()
        .filter(|f| {
            lowers
                .lookup(format!("etc/{f}").as_bytes())
                .map_or(true, |x| x.is_none())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let dir = upper.join("etc");
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    for f in missing {
        let p = dir.join(f);
        std::fs::write(&p, b"").map_err(io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(io(&p))?;
    }
    // The image's /etc metadata, as a copy-up would keep it (an owner that cannot be mapped
    // here, rootless, stays the caller's).
    let _ = std::os::unix::fs::lchown(&dir, Some(etc.st.st_uid), Some(etc.st.st_gid));
    std::fs::set_permissions(
        &dir,
        std::fs::Permissions::from_mode(etc.st.st_mode & 0o7777),
    )
    .map_err(io(&dir))?;
    let t = |s: i64, ns: i64| {
        std::time::UNIX_EPOCH
            + std::time::Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32)
    };
    let f = std::fs::File::open(&dir).map_err(io(&dir))?;
    f.set_times(
        std::fs::FileTimes::new()
            .set_accessed(t(etc.st.st_atime, etc.st.st_atime_nsec))
            .set_modified(t(etc.st.st_mtime, etc.st.st_mtime_nsec)),
    )
    .map_err(io(&dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_and_mount_specs_parse_as_docker_reads_them() {
        let v = parse_volume("data:/var/lib/x:ro").unwrap();
        assert_eq!(
            (v.kind, v.source.as_deref(), v.target.as_str(), v.read_only),
            ("volume", Some("data"), "/var/lib/x", true)
        );
        let b = parse_volume("/srv//web/:/usr/share/html").unwrap();
        assert_eq!((b.kind, b.source.as_deref()), ("bind", Some("/srv/web")));
        let a = parse_volume("/cache").unwrap();
        assert_eq!(
            (a.kind, a.source, a.target.as_str()),
            ("volume", None, "/cache")
        );
        assert!(parse_volume("x:relative").is_err());
        assert!(parse_volume("x:/").is_err());
        assert!(parse_volume("data:/p:bogus").is_err());
        assert!(parse_volume("a:b:c:d").is_err());
        let m = parse_mount("type=tmpfs,target=/run,tmpfs-size=1m").unwrap();
        assert_eq!((m.kind, m.options.as_str()), ("tmpfs", "size=1m"));
        let m = parse_mount("type=volume,src=v1,dst=/v,readonly").unwrap();
        assert!(m.read_only && m.source.as_deref() == Some("v1"));
        assert!(parse_mount("type=bind,target=/x").is_err());
        assert!(parse_mount("type=bind,source=/does/not/exist,target=/x").is_err());
        assert!(parse_mount("type=nfs,target=/x").is_err());
        assert!(parse_mount("type=volume,target=/x,colour=blue").is_err());
        assert_eq!(normalize("/a//b/./c/"), "/a/b/c");
        assert!(default_name(&"ab".repeat(32)).contains('_'));
    }
}
