//! What the kernel's overlayfs supports here, found by trial mounts, in the spirit of
//! `docker info`'s Storage Driver section.

use std::fmt;
use std::path::Path;

use crate::mount::{Options, Overlay, unmount};

/// Kernel overlay features found on one backing filesystem.
#[derive(Debug, Clone, Default)]
pub struct Features {
    /// Kernel release.
    pub kernel: String,
    /// Backing filesystem type name (`ext4`, `xfs`, `tmpfs`, ...).
    pub backing_fs: String,
    /// The backing filesystem fills in `d_type` (overlay needs it).
    pub d_type: bool,
    /// Running in a user namespace (not the initial one).
    pub in_userns: bool,
    /// A plain overlay with upper and work dir mounts.
    pub overlay: bool,
    /// `lowerdir+` (new mount API, kernel 6.8+).
    pub lowerdir_append: bool,
    /// `userxattr`.
    pub userxattr: bool,
    /// `metacopy=on`.
    pub metacopy: bool,
    /// `redirect_dir=on`.
    pub redirect_dir: bool,
    /// The `index` feature exists (so `index=off` must be passed, as containerd does).
    pub index: bool,
    /// `volatile`.
    pub volatile: bool,
    /// Why the plain overlay did not mount, if it did not.
    pub error: Option<String>,
}

impl Features {
    /// The options Strata mounts with here: containerd's, plus metacopy and redirect_dir where
    /// supported.
    pub fn options(&self) -> Options {
        Options {
            userxattr: self.in_userns,
            index_off: self.index,
            metacopy: self.metacopy,
            redirect_dir: self.redirect_dir,
            volatile: false,
            readonly: false,
        }
    }
}

impl Features {
    /// One `key=value` line per field (the form [`probe_cached`] keeps).
    pub fn to_text(&self) -> String {
        let b = |v: bool| if v { "1" } else { "0" };
        format!(
            "kernel={}\nbacking_fs={}\nd_type={}\nin_userns={}\noverlay={}\nlowerdir_append={}\nuserxattr={}\nmetacopy={}\nredirect_dir={}\nindex={}\nvolatile={}\nerror={}\n",
            self.kernel,
            self.backing_fs,
            b(self.d_type),
            b(self.in_userns),
            b(self.overlay),
            b(self.lowerdir_append),
            b(self.userxattr),
            b(self.metacopy),
            b(self.redirect_dir),
            b(self.index),
            b(self.volatile),
            self.error.as_deref().unwrap_or("").replace('\n', " "),
        )
    }

    /// Parses [`Features::to_text`]; `None` if a field is missing.
    pub fn from_text(text: &str) -> Option<Features> {
        let map: std::collections::HashMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        let b = |k: &str| map.get(k).map(|v| *v == "1");
        Some(Features {
            kernel: map.get("kernel")?.to_string(),
            backing_fs: map.get("backing_fs")?.to_string(),
            d_type: b("d_type")?,
            in_userns: b("in_userns")?,
            overlay: b("overlay")?,
            lowerdir_append: b("lowerdir_append")?,
            userxattr: b("userxattr")?,
            metacopy: b("metacopy")?,
            redirect_dir: b("redirect_dir")?,
            index: b("index")?,
            volatile: b("volatile")?,
            error: map
                .get("error")
                .filter(|e| !e.is_empty())
                .map(|e| e.to_string()),
        })
    }
}

/// [`probe`], remembered in `cache` for as long as nothing it depends on can have changed: the
/// same boot (so the same kernel and modules) and the same user-namespace mapping. Trial mounts
/// take milliseconds, which every short-lived CLI command would otherwise pay.
pub fn probe_cached(dir: &Path, cache: &Path) -> Features {
    let key = format!(
        "boot={} uid_map={}",
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim(),
        std::fs::read_to_string("/proc/self/uid_map")
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((k, rest)) = text.split_once('\n') {
            if k == key {
                if let Some(f) = Features::from_text(rest) {
                    return f;
                }
            }
        }
    }
    let f = probe(dir);
    let tmp = cache.with_extension(format!("tmp-{}", std::process::id()));
    if std::fs::write(&tmp, format!("{key}\n{}", f.to_text()))
        .and_then(|()| std::fs::rename(&tmp, cache))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
    f
}

/// The name of a filesystem magic number.
pub fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlay".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6969 => "nfs".into(),
        0x6573_5546 => "fuse".into(),
        0x5346_414F => "afs".into(),
        0x0187 => "autofs".into(),
        0x858458F6 => "ramfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        other => format!("unknown (0x{other:x})"),
    }
}

/// True when this process is not in the initial user namespace.
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let f: Vec<&str> = map.split_whitespace().collect();
            !(f.len() == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
        }
        Err(_) => false,
    }
}

/// Probes overlay features with trial mounts in a scratch directory created under `dir`, which
/// must be on the backing filesystem of interest.
pub fn probe(dir: &Path) -> Features {
    let mut f = Features {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        in_userns: in_user_namespace(),
        index: Path::new("/sys/module/overlay/parameters/index").exists(),
        ..Default::default()
    };
    if let Ok(s) = nix::sys::statfs::statfs(dir) {
        f.backing_fs = fs_name(s.filesystem_type().0);
    }
    let scratch = match tempdir_in(dir) {
        Ok(s) => s,
        Err(e) => {
            f.error = Some(format!(
                "cannot create a scratch dir in {}: {e}",
                dir.display()
            ));
            return f;
        }
    };
    f.d_type = check_d_type(&scratch);
    let trial = |name: &str, opts: Options, lowers: usize| -> Result<(), String> {
        let base = scratch.join(name);
        let mk = |p: &Path| std::fs::create_dir_all(p).map_err(|e| e.to_string());
        let mut ls = Vec::new();
        for i in 0..lowers {
            let l = base.join(format!("l{i}"));
            mk(&l)?;
            ls.push(l);
        }
        let (u, w, m) = (base.join("u"), base.join("w"), base.join("m"));
        mk(&u)?;
        mk(&w)?;
        mk(&m)?;
        let o = Overlay {
            lowers: ls,
            upper: Some(u),
            work: Some(w),
            options: opts,
        };
        o.mount(&m).map_err(|e| e.to_string())?;
        unmount(&m, false).map_err(|e| e.to_string())
    };
    let base = Options {
        userxattr: f.in_userns,
        index_off: f.index,
        ..Default::default()
    };
    match trial("base", base, 2) {
        Ok(()) => f.overlay = true,
        Err(e) => {
            f.error = Some(e);
            let _ = std::fs::remove_dir_all(&scratch);
            return f;
        }
    }
    f.lowerdir_append = lowerdir_append_works(&scratch);
    f.userxattr = f.in_userns
        || trial(
            "userxattr",
            Options {
                userxattr: true,
                ..base
            },
            1,
        )
        .is_ok();
    f.metacopy = trial(
        "metacopy",
        Options {
            metacopy: true,
            ..base
        },
        1,
    )
    .is_ok();
    f.redirect_dir = trial(
        "redirect",
        Options {
            redirect_dir: true,
            ..base
        },
        1,
    )
    .is_ok();
    f.volatile = trial(
        "volatile",
        Options {
            volatile: true,
            ..base
        },
        1,
    )
    .is_ok();
    let _ = std::fs::remove_dir_all(&scratch);
    f
}

fn lowerdir_append_works(scratch: &Path) -> bool {
    let dir = scratch.join("append");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    crate::sys::fsopen(c"overlay")
        .and_then(|fs| {
            let v = crate::sys::os_cstr(dir.as_os_str())?;
            crate::sys::fsconfig_string(std::os::fd::AsFd::as_fd(&fs), c"lowerdir+", &v)
        })
        .is_ok()
}

fn tempdir_in(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    let p = dir.join(format!(".strata-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn check_d_type(dir: &Path) -> bool {
    let f = dir.join("dtype");
    if std::fs::write(&f, b"").is_err() {
        return false;
    }
    let ok = std::fs::File::open(dir)
        .ok()
        .and_then(|d| crate::sys::read_dir(std::os::fd::AsFd::as_fd(&d)).ok())
        .is_some_and(|names| {
            names
                .iter()
                .any(|(n, t)| n == b"dtype" && *t == libc::DT_REG)
        });
    let _ = std::fs::remove_file(&f);
    ok
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "true" } else { "false" };
        writeln!(f, " Kernel Version: {}", self.kernel)?;
        writeln!(f, " Backing Filesystem: {}", self.backing_fs)?;
        writeln!(f, " Supports d_type: {}", yn(self.d_type))?;
        writeln!(f, " User Namespace: {}", yn(self.in_userns))?;
        writeln!(
            f,
            " Kernel Overlay: {}",
            if self.overlay {
                "true".to_string()
            } else {
                format!("false ({})", self.error.as_deref().unwrap_or("unknown"))
            }
        )?;
        writeln!(
            f,
            " lowerdir+ (new mount API): {}",
            yn(self.lowerdir_append)
        )?;
        writeln!(f, " userxattr: {}", yn(self.userxattr))?;
        writeln!(f, " metacopy: {}", yn(self.metacopy))?;
        writeln!(f, " redirect_dir: {}", yn(self.redirect_dir))?;
        writeln!(
            f,
            " index: {}",
            if self.index {
                "present (mounted with index=off)"
            } else {
                "absent"
            }
        )?;
        write!(f, " volatile: {}", yn(self.volatile))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_round_trip_as_text() {
        let f = Features {
            kernel: "6.18".into(),
            backing_fs: "ext4".into(),
            d_type: true,
            metacopy: true,
            error: Some("x\ny".into()),
            ..Default::default()
        };
        let g = Features::from_text(&f.to_text()).unwrap();
        assert_eq!(g.to_text(), f.to_text());
        assert_eq!(g.error.as_deref(), Some("x y"));
        assert!(Features::from_text("kernel=1\n").is_none());
    }
}
