//! The image commands of the CLI: load, save, images, tag, rmi, inspect, history.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use strata_runtime::image::{Image, Images, Reference, load, save};

use crate::cli::ImagesArgs;

/// The store root: `--root`, else `/var/lib/strata` as root, `$XDG_DATA_HOME/strata` otherwise.
pub fn root(given: Option<PathBuf>) -> PathBuf {
    if let Some(r) = given {
        return r;
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/strata");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".local/share")
        });
    data.join("strata")
}

fn open(root: &Path) -> Result<Images> {
    Images::open(root).with_context(|| format!("opening the image store at {}", root.display()))
}

/// The 12-digit image ID Docker shows.
fn short(img: &Image) -> String {
    img.config.hex()[..12].to_string()
}

/// Sizes as Docker prints them (SI units, three significant digits).
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    let s = if u == 0 {
        format!("{n}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    };
    format!("{s}{}", units[u])
}

/// Seconds since the epoch of an RFC 3339 time (`2024-01-02T03:04:05.6Z`, offsets allowed).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if b.get(4) != Some(&b'-')
        || b.get(10)
            .is_none_or(|c| *c != b'T' && *c != b't' && *c != b' ')
    {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') => 0,
        Some(c @ (b'+' | b'-')) => {
            let sign = if *c == b'+' { 1 } else { -1 };
            sign * (num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// "3 hours ago", as Docker says it.
pub fn ago(created: Option<&str>) -> String {
    let Some(t) = created.and_then(parse_rfc3339) else {
        return "N/A".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - t).max(0);
    let (n, unit) = match s {
        0..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        86_400..=1_209_599 => (s / 86_400, "day"),
        1_209_600..=5_183_999 => (s / 604_800, "week"),
        5_184_000..=63_071_999 => (s / 2_592_000, "month"),
        _ => (s / 31_536_000, "year"),
    };
    if n <= 1 && unit == "second" {
        return "Less than a second ago".into();
    }
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

pub fn cmd_load(root: &Path, input: &Path, quiet: bool) -> Result<()> {
    let mut images = open(root)?;
    let loaded =
        load(&mut images, input).with_context(|| format!("loading {}", input.display()))?;
    if !quiet {
        for (img, refs) in &loaded {
            if refs.is_empty() {
                println!("Loaded image ID: {}", img.config);
            }
            for r in refs {
                println!("Loaded image: {}", r.familiar());
            }
        }
    }
    Ok(())
}

pub fn cmd_save(root: &Path, output: &Path, names: &[String]) -> Result<()> {
    let images = open(root)?;
    let mut sel = Vec::new();
    for n in names {
        let img = images.store.resolve(n)?;
        let r = n
            .parse::<Reference>()
            .ok()
            .filter(|r| img.tags.contains(r))
            .or_else(|| img.tags.first().cloned());
        sel.push((img, r));
    }
    save(&images, &sel, output).with_context(|| format!("saving to {}", output.display()))
}

pub fn cmd_images(root: &Path, a: &ImagesArgs) -> Result<()> {
    let images = open(root)?;
    let mut dangling: Option<bool> = None;
    let mut pattern: Option<String> = None;
    for f in &a.filter {
        match f.split_once('=') {
            Some(("dangling", v @ ("true" | "false"))) => dangling = Some(v == "true"),
            Some(("reference", v)) => pattern = Some(v.to_string()),
            _ => bail!("invalid filter {f:?}: expected dangling=true|false or reference=PATTERN"),
        }
    }
    if a.format != "table" && a.format != "json" {
        bail!("unknown format {:?}: expected table or json", a.format);
    }
    let mut rows: Vec<(String, String, &Image)> = Vec::new();
    let list = images.store.images()?;
    for img in &list {
        if dangling.is_some_and(|d| d != img.tags.is_empty()) {
            continue;
        }
        if img.tags.is_empty() {
            if pattern.is_none() {
                rows.push(("<none>".into(), "<none>".into(), img));
            }
            continue;
        }
        for t in &img.tags {
            if pattern
                .as_ref()
                .is_some_and(|p| !glob(p, &t.familiar()) && !glob(p, &t.familiar_repository()))
            {
                continue;
            }
            rows.push((
                t.familiar_repository(),
                t.tag.clone().unwrap_or_else(|| "<none>".into()),
                img,
            ));
        }
    }
    let _ = a.all;
    if a.quiet {
        let mut seen = Vec::new();
        for (_, _, img) in &rows {
            if !seen.contains(&img.config) {
                seen.push(img.config);
                println!("{}", short(img));
            }
        }
        return Ok(());
    }
    if a.format == "json" {
        for (repo, tag, img) in &rows {
            let v = serde_json::json!({
                "Repository": repo, "Tag": tag, "ID": short(img), "Digest": img.manifest.to_string(),
                "CreatedAt": img.created, "CreatedSince": ago(img.created.as_deref()), "Size": human_size(img.size), "VirtualSize": img.size,
            });
            println!("{v}");
        }
        return Ok(());
    }
    let table: Vec<[String; 5]> = rows
        .iter()
        .map(|(r, t, img)| {
            [
                r.clone(),
                t.clone(),
                short(img),
                ago(img.created.as_deref()),
                human_size(img.size),
            ]
        })
        .collect();
    print_table(
        &["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
        &table,
    );
    Ok(())
}

/// A glob with `*` only, as Docker's reference filter.
fn glob(p: &str, s: &str) -> bool {
    match p.split_once('*') {
        None => p == s,
        Some((head, tail)) => {
            s.starts_with(head)
                && (0..=s.len() - head.len()).any(|i| glob(tail, &s[head.len() + i..]))
        }
    }
}

pub fn print_table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}   ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn cmd_tag(root: &Path, source: &str, target: &str) -> Result<()> {
    let mut images = open(root)?;
    let img = images.store.resolve(source)?;
    let t: Reference = target.parse()?;
    if t.digest.is_some() {
        bail!("cannot tag with a digest reference: {target}");
    }
    images.store.tag(&img, &t)?;
    Ok(())
}

pub fn cmd_rmi(root: &Path, names: &[String], force: bool) -> Result<()> {
    let mut images = open(root)?;
    let mut failed = false;
    for n in names {
        if let Err(e) = rmi_one(root, &mut images, n, force) {
            eprintln!("Error response: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some images could not be removed");
    }
    Ok(())
}

fn rmi_one(root: &Path, images: &mut Images, n: &str, force: bool) -> Result<()> {
    let img = images.store.resolve(n)?;
    let users: Vec<String> = strata_runtime::container::list(root)?
        .into_iter()
        .filter(|c| {
            c.config()
                .ok()
                .and_then(|v| v["ImageId"].as_str().map(str::to_string))
                .as_deref()
                == Some(img.config.to_string().as_str())
        })
        .map(|c| c.id[..12].to_string())
        .collect();
    let last_name = n
        .parse::<Reference>()
        .ok()
        .filter(|r| img.tags.contains(r))
        .is_none_or(|_| img.tags.len() <= 1);
    if !users.is_empty() && last_name && !force {
        bail!(
            "conflict: unable to remove {n} (must be forced) - image is being used by container {}",
            users.join(", ")
        );
    }
    if let Some(r) = n.parse::<Reference>().ok().filter(|r| img.tags.contains(r)) {
        // By tag: untag; the image goes once no tag is left.
        images.store.untag(&r)?;
        println!("Untagged: {}", r.familiar());
        if img.tags.len() > 1 {
            return Ok(());
        }
        return delete_records(images, &[img]);
    }
    // By ID: every record of that image ID.
    let group = images.store.same_id(&img)?;
    let tags: Vec<Reference> = group.iter().flat_map(|i| i.tags.clone()).collect();
    if tags.len() > 1 && !force {
        bail!(
            "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
            short(&img)
        );
    }
    for r in &tags {
        images.store.untag(r)?;
        println!("Untagged: {}", r.familiar());
    }
    delete_records(images, &group)
}

fn delete_records(images: &mut Images, group: &[Image]) -> Result<()> {
    let mut removed = Vec::new();
    for i in group {
        removed.extend(images.delete(i)?);
    }
    println!("Deleted: {}", group[0].config);
    for c in removed {
        println!("Deleted: {c}");
    }
    Ok(())
}

pub fn cmd_inspect(root: &Path, names: &[String]) -> Result<()> {
    let images = open(root)?;
    let mut out = Vec::new();
    for n in names {
        let img = images.store.resolve(n)?;
        let p = images.parse(&img)?;
        let c = &p.config;
        out.push(serde_json::json!({
            "Id": img.config.to_string(),
            "RepoTags": img.tags.iter().map(Reference::familiar).collect::<Vec<_>>(),
            "RepoDigests": img.tags.iter().map(|t| format!("{}@{}", t.familiar_repository(), img.manifest)).collect::<Vec<_>>(),
            "Created": c.created(),
            "Author": c.author(),
            "Architecture": c.architecture().to_string(),
            "Os": c.os().to_string(),
            "Size": img.size,
            "Config": c.config(),
            "RootFS": { "Type": "layers", "Layers": c.rootfs().diff_ids() },
            "History": c.history(),
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn cmd_history(root: &Path, name: &str, quiet: bool) -> Result<()> {
    let images = open(root)?;
    let img = images.store.resolve(name)?;
    let p = images.parse(&img)?;
    let chains = Images::chains(&p)?;
    let mut sizes = chains
        .iter()
        .map(|c| images.store.layer_size(c).map(|s| s.unwrap_or(0)))
        .collect::<strata_runtime::Result<Vec<u64>>>()?;
    let history = p.config.history().clone().unwrap_or_default();
    let mut rows = Vec::new();
    // History entries with empty_layer add no layer; the others take the layers in order.
    let mut next = 0;
    for h in &history {
        let size = if h.empty_layer().unwrap_or(false) {
            0
        } else {
            next += 1;
            sizes.get(next - 1).copied().unwrap_or(0)
        };
        rows.push((
            h.created().clone(),
            h.created_by().clone().unwrap_or_default(),
            size,
            h.comment().clone().unwrap_or_default(),
        ));
    }
    if history.is_empty() {
        for s in sizes.drain(..) {
            rows.push((None, String::new(), s, String::new()));
        }
    }
    rows.reverse();
    let table: Vec<[String; 5]> = rows
        .iter()
        .enumerate()
        .map(|(i, (created, by, size, comment))| {
            let id = if i == 0 {
                short(&img)
            } else {
                "<missing>".into()
            };
            let by: String = if by.chars().count() > 45 {
                by.chars().take(44).collect::<String>() + "…"
            } else {
                by.clone()
            };
            [
                id,
                ago(created.as_deref()),
                by,
                human_size(*size),
                comment.clone(),
            ]
        })
        .collect();
    if quiet {
        for r in &table {
            println!("{}", r[0]);
        }
        return Ok(());
    }
    print_table(
        &["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
        &table,
    );
    Ok(())
}

pub fn cmd_run(root: &Path, a: crate::cli::RunArgs) -> Result<()> {
    let mut images = open(root)?;
    let o = strata_runtime::container::RunOptions {
        image: a.image,
        cmd: a.cmd,
        name: a.name,
        rm: a.rm,
        env: a.env,
        workdir: a.workdir,
        hostname: a.hostname,
        entrypoint: a.entrypoint,
        read_only: a.read_only,
        user: a.user,
    };
    let code =
        strata_runtime::container::run(&mut images, root, &o).context("running the container")?;
    // exit() skips destructors: close the stores first (the snapshotter finishes deletions).
    drop(images);
    std::process::exit(code);
}

pub fn cmd_ps(root: &Path, all: bool, quiet: bool, size: bool) -> Result<()> {
    use strata_runtime::container;
    let mut images = open(root)?;
    let mut rows = Vec::new();
    for c in container::list(root)? {
        let cfg = c.config()?;
        let (status, code) = container::status(&c.state()?);
        if !all && status != "running" {
            continue;
        }
        let shown = match (status.as_str(), code) {
            ("running", _) => "Up".to_string(),
            ("exited", Some(code)) => format!("Exited ({code})"),
            (s, _) => s.to_string(),
        };
        let mut r = vec![
            c.id[..12].to_string(),
            cfg["Image"].as_str().unwrap_or_default().to_string(),
            format!(
                "{:?}",
                cfg["Args"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            ),
            shown,
            cfg["Name"].as_str().unwrap_or_default().to_string(),
        ];
        if size {
            let used = images
                .snapshotter()?
                .usage(&c.snapshot_key())
                .map(|u| u.size as u64)
                .unwrap_or(0);
            let virt = images
                .store
                .resolve(cfg["ImageId"].as_str().unwrap_or_default())
                .map(|i| i.size)
                .unwrap_or(0);
            r.push(format!(
                "{} (virtual {})",
                human_size(used),
                human_size(used + virt)
            ));
        }
        rows.push(r);
    }
    if quiet {
        for r in rows {
            println!("{}", r[0]);
        }
        return Ok(());
    }
    let mut head = vec!["CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "NAMES"];
    if size {
        head.push("SIZE");
    }
    if size {
        let t: Vec<[String; 6]> = rows
            .into_iter()
            .map(|r| r.try_into().expect("six columns"))
            .collect();
        print_table(&[head[0], head[1], head[2], head[3], head[4], head[5]], &t);
    } else {
        let t: Vec<[String; 5]> = rows
            .into_iter()
            .map(|r| r.try_into().expect("five columns"))
            .collect();
        print_table(&[head[0], head[1], head[2], head[3], head[4]], &t);
    }
    Ok(())
}

pub fn cmd_diff(root: &Path, name: &str) -> Result<()> {
    let mut images = open(root)?;
    let c = strata_runtime::container::find(root, name)?;
    let (upper, lowers) = images.snapshotter()?.layer_dirs(&c.snapshot_key())?;
    let changes =
        strata_overlay::diff::changes_native(&upper, &strata_overlay::diff::LowerView::new(lowers))
            .with_context(|| format!("listing the changes of container {name}"))?;
    for ch in changes {
        println!("{ch}");
    }
    Ok(())
}

pub fn cmd_rm(root: &Path, names: &[String]) -> Result<()> {
    use strata_runtime::container;
    let mut images = open(root)?;
    let mut failed = false;
    for n in names {
        let r = (|| -> Result<()> {
            let c = container::find(root, n)?;
            if container::status(&c.state()?).0 == "running" {
                bail!(
                    "cannot remove container {n}: it is running (stop it first, or use -f once stop lands)"
                );
            }
            container::run::remove(&mut images, &c)?;
            println!("{n}");
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("Error response: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some containers could not be removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_docker() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_234_567), "1.23MB");
        assert_eq!(human_size(12_345_678), "12.3MB");
        assert_eq!(human_size(123_456_789), "123MB");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00.5+01:00"),
            Some(1_709_204_400)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
        assert!(glob("local*/te*", "localhost/test"));
        assert!(!glob("x*", "localhost/test"));
    }
}
