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
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".local/share")
        });
    data.join("strata")
}

pub fn open(root: &Path) -> Result<Images> {
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

pub use strata_runtime::time::ago;

pub fn cmd_load(root: &Path, input: &Path, quiet: bool) -> Result<()> {
    let mut images = open(root)?;
    let spinner = if quiet {
        None
    } else {
        progress("loading", None)
    };
    let loaded = load(&mut images, input).with_context(|| format!("loading {}", input.display()));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let loaded = loaded?;
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
    let spinner = progress("saving", None);
    let r = save(&images, &sel, output).with_context(|| format!("saving to {}", output.display()));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    r
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
    if last_name {
        match images.check_delete(&img) {
            Ok(()) => {}
            // Forced, as Docker: the names go, the image stays (dangling) for its containers.
            Err(strata_runtime::Error::Conflict(_)) if force => {
                let tags: Vec<Reference> =
                    match n.parse::<Reference>().ok().filter(|r| img.tags.contains(r)) {
                        Some(r) => vec![r],
                        None => images
                            .store
                            .same_id(&img)?
                            .iter()
                            .flat_map(|i| i.tags.clone())
                            .collect(),
                    };
                for r in tags {
                    images.store.untag(&r)?;
                    println!("Untagged: {}", r.familiar());
                }
                return Ok(());
            }
            // Nothing is untagged if the image then can't go.
            Err(e) => return Err(e.into()),
        }
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

/// `inspect` of one image: Docker's fields.
pub fn inspect_image(images: &Images, n: &str) -> Result<serde_json::Value> {
    let img = images.store.resolve(n)?;
    let p = images.parse(&img)?;
    let c = &p.config;
    Ok(serde_json::json!({
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
    }))
}

/// A spinner on stderr for work that may take a while; `None` when stderr is not a terminal.
pub fn progress(msg: &'static str, total: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let pb = match total {
        Some(t) => indicatif::ProgressBar::new(t).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner(),
    };
    pb.set_message(msg);
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(pb)
}

/// Removes dangling images (`all`: every image no container uses); returns bytes reclaimed.
pub fn prune(root: &Path, images: &mut Images, all: bool) -> Result<u64> {
    let used: std::collections::HashSet<String> = strata_runtime::container::list(root)?
        .iter()
        .filter_map(|c| c.config().ok()?["ImageId"].as_str().map(String::from))
        .collect();
    let mut reclaimed = 0;
    let mut deleted = Vec::new();
    for img in images.store.images()? {
        if used.contains(&img.config.to_string()) || (!all && !img.tags.is_empty()) {
            continue;
        }
        // A container stands on one of its layers (through a commit): keep it, tags too.
        match images.check_delete(&img) {
            Err(strata_runtime::Error::Conflict(_)) => continue,
            r => r?,
        }
        for t in &img.tags {
            images.store.untag(t)?;
            deleted.push(format!("untagged: {}", t.familiar()));
        }
        let chains = images.delete(&img)?;
        deleted.push(format!("deleted: {}", img.config));
        for c in chains {
            deleted.push(format!("deleted: {c}"));
        }
        reclaimed += img.size;
    }
    if !deleted.is_empty() {
        println!("Deleted Images:");
        for d in deleted {
            println!("{d}");
        }
        println!();
    }
    Ok(reclaimed)
}

pub fn cmd_prune(root: &Path, all: bool) -> Result<()> {
    let mut images = open(root)?;
    let n = prune(root, &mut images, all)?;
    println!("Total reclaimed space: {}", human_size(n));
    Ok(())
}

pub fn cmd_import(
    root: &Path,
    file: &Path,
    reference: Option<String>,
    message: Option<String>,
    changes: Vec<String>,
) -> Result<()> {
    let mut images = open(root)?;
    let reference = reference
        .map(|r| r.parse::<Reference>())
        .transpose()
        .context("the new image's name")?;
    let spinner = progress("importing", None);
    let img = strata_runtime::image::import(&mut images, file, reference, message, &changes)
        .with_context(|| format!("importing {}", file.display()));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    println!("{}", img?.config);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_docker() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_234_567), "1.23MB");
        assert_eq!(human_size(12_345_678), "12.3MB");
        assert_eq!(human_size(123_456_789), "123MB");
        assert!(glob("local*/te*", "localhost/test"));
        assert!(!glob("x*", "localhost/test"));
    }
}
