//! The container, volume and system commands of the CLI.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use strata_runtime::container::{self, Container, Status, commit::CommitOptions, view};
use strata_runtime::image::{Images, Reference};
use strata_runtime::time::{ago, human_duration, now_secs, parse_rfc3339};
use strata_runtime::volume;

use crate::cli::{RunArgs, VolumeCommand};
use crate::images::{human_size, open, print_table};

fn options(a: RunArgs) -> container::RunOptions {
    container::RunOptions {
        image: a.image,
        cmd: a.cmd,
        name: a.name,
        rm: a.rm,
        env: a.env,
        env_file: a.env_file,
        workdir: a.workdir,
        hostname: a.hostname,
        entrypoint: a.entrypoint,
        read_only: a.read_only,
        user: a.user,
        volumes: a.volume,
        mounts: a.mount,
        tmpfs: a.tmpfs,
        interactive: a.interactive,
        tty: a.tty,
        network: a.network,
    }
}

/// Runs `f` on each named container, printing the name on success and Docker's
/// "Error response" on failure; fails if any failed.
fn each(root: &Path, names: &[String], mut f: impl FnMut(&Container) -> Result<()>) -> Result<()> {
    let mut failed = false;
    for n in names {
        let r = container::find(root, n)
            .map_err(anyhow::Error::from)
            .and_then(|c| f(&c));
        match r {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("Error response: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some containers failed");
    }
    Ok(())
}

pub fn run(root: &Path, a: RunArgs) -> Result<()> {
    let detach = a.detach;
    if a.tty && a.interactive && !detach && !std::io::stdin().is_terminal() {
        bail!("the input device is not a TTY: drop -t, or run from a terminal");
    }
    let mut images = open(root)?;
    let o = options(a);
    let c = container::create(&mut images, root, &o).context("creating the container")?;
    if detach {
        if let Err(e) = container::start(&c, false) {
            if o.rm {
                let _ = container::remove(&mut images, root, &c, true, true);
            }
            return Err(anyhow::Error::from(e).context("starting the container"));
        }
        println!("{}", c.id);
        return Ok(());
    }
    // exit() skips destructors: close the stores first (the snapshotter finishes deletions).
    drop(images);
    let code = container::start(&c, true)
        .context("starting the container")?
        .unwrap_or(0);
    std::process::exit(code);
}

pub fn create(root: &Path, a: RunArgs) -> Result<()> {
    let mut images = open(root)?;
    let c = container::create(&mut images, root, &options(a)).context("creating the container")?;
    println!("{}", c.id);
    Ok(())
}

pub fn start(root: &Path, names: &[String], attach: bool) -> Result<()> {
    if attach {
        if names.len() != 1 {
            bail!("start -a takes one container");
        }
        let c = container::find(root, &names[0])?;
        let code = container::start(&c, true)?.unwrap_or(0);
        std::process::exit(code);
    }
    let mut images = open(root)?;
    each(root, names, |c| {
        // A commit that stopped between handing the upper over and rebasing is finished here.
        container::commit::settle(&mut images, c)?;
        Ok(container::start(c, false).map(drop)?)
    })
}

pub fn stop(root: &Path, names: &[String], secs: u64) -> Result<()> {
    each(root, names, |c| {
        Ok(container::stop(c, Duration::from_secs(secs))?)
    })
}

pub fn restart(root: &Path, names: &[String], secs: u64) -> Result<()> {
    each(root, names, |c| {
        container::stop(c, Duration::from_secs(secs))?;
        Ok(container::start(c, false).map(drop)?)
    })
}

pub fn kill(root: &Path, names: &[String], sig: &str) -> Result<()> {
    container::lifecycle::parse_signal(sig)?;
    each(root, names, |c| Ok(container::kill(c, sig)?))
}

pub fn wait(root: &Path, names: &[String]) -> Result<()> {
    let mut failed = false;
    for n in names {
        match container::find(root, n).and_then(|c| container::wait(&c)) {
            Ok(code) => println!("{code}"),
            Err(e) => {
                eprintln!("Error response: {e}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some containers failed");
    }
    Ok(())
}

pub fn logs(root: &Path, name: &str, follow: bool, timestamps: bool, tail: &str) -> Result<()> {
    let c = container::find(root, name)?;
    let tail = match tail {
        "all" | "-1" => None,
        n => Some(
            n.parse::<usize>()
                .with_context(|| format!("--tail {n:?}: expected a number or all"))?,
        ),
    };
    container::stdio_log(&c, tail, timestamps, follow)?;
    Ok(())
}

pub fn exec(root: &Path, name: &str, o: container::ExecOptions) -> Result<()> {
    if o.tty && o.interactive && !std::io::stdin().is_terminal() {
        bail!("the input device is not a TTY: drop -t, or run from a terminal");
    }
    let c = container::find(root, name)?;
    let code = container::exec(&c, &o)?;
    std::process::exit(code);
}

/// `ps` STATUS as Docker writes it.
fn status_text(c: &Container) -> Result<String> {
    let st = c.state()?;
    let since = |field: &str| {
        st[field]
            .as_str()
            .and_then(parse_rfc3339)
            .map(|t| human_duration(now_secs() - t))
    };
    Ok(match container::status_of(&st) {
        Status::Created => "Created".into(),
        Status::Running => format!("Up {}", since("StartedAt").unwrap_or_default()),
        Status::Exited(code) => match since("FinishedAt") {
            Some(t) => format!("Exited ({code}) {t} ago"),
            None => format!("Exited ({code})"),
        },
    })
}

pub fn ps(root: &Path, all: bool, quiet: bool, size: bool) -> Result<()> {
    let mut images = open(root)?;
    let mut rows = Vec::new();
    let mut list = container::list(root)?;
    list.reverse();
    for c in list {
        // A container removed meanwhile (a --rm one ending) is simply not listed.
        let (Ok(cfg), Ok(status)) = (c.config(), c.status()) else {
            continue;
        };
        if !all && status != Status::Running {
            continue;
        }
        let mut cmd = container::strings_of(&cfg["Args"]).join(" ");
        if cmd.chars().count() > 20 {
            cmd = cmd.chars().take(19).collect::<String>() + "…";
        }
        let mut r = vec![
            c.id[..12].to_string(),
            cfg["Image"].as_str().unwrap_or_default().to_string(),
            format!("\"{cmd}\""),
            ago(cfg["Created"].as_str()),
            status_text(&c).unwrap_or_else(|_| "Removing".into()),
            c.name(),
        ];
        if size {
            let used = container::commit::rw_size(&mut images, &c).unwrap_or(0);
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
    let head = [
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "NAMES",
    ];
    if size {
        let t: Vec<[String; 7]> = rows
            .into_iter()
            .map(|r| r.try_into().expect("seven columns"))
            .collect();
        let mut h7 = [""; 7];
        h7[..6].copy_from_slice(&head);
        h7[6] = "SIZE";
        print_table(&h7, &t);
    } else {
        let t: Vec<[String; 6]> = rows
            .into_iter()
            .map(|r| r.try_into().expect("six columns"))
            .collect();
        print_table(&head, &t);
    }
    Ok(())
}

pub fn rm(root: &Path, names: &[String], force: bool, volumes: bool) -> Result<()> {
    let mut images = open(root)?;
    each(root, names, |c| {
        Ok(container::remove(&mut images, root, c, force, volumes)?)
    })
}

pub fn diff(root: &Path, name: &str) -> Result<()> {
    let mut images = open(root)?;
    let c = container::find(root, name)?;
    let changes = container::commit::changes(&mut images, &c)
        .with_context(|| format!("listing the changes of container {name}"))?;
    for ch in changes {
        println!("{ch}");
    }
    Ok(())
}

pub fn commit(
    root: &Path,
    name: &str,
    reference: Option<String>,
    message: Option<String>,
    author: Option<String>,
    changes: Vec<String>,
) -> Result<()> {
    let mut images = open(root)?;
    let c = container::find(root, name)?;
    let reference = reference
        .map(|r| r.parse::<Reference>())
        .transpose()
        .context("the new image's name")?;
    let o = CommitOptions {
        reference,
        message,
        author,
        changes,
    };
    let spinner = crate::images::progress("committing", None);
    let done = container::commit::commit(&mut images, &c, &o)
        .with_context(|| format!("committing container {name}"));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let done = done?;
    tracing::info!(adoption = ?done.adoption, diff_id = %done.diff_id, "committed");
    println!("{}", done.image.config);
    Ok(())
}

pub fn export(root: &Path, name: &str, out: Option<&Path>) -> Result<()> {
    let c = container::find(root, name)?;
    if out.is_none() && std::io::stdout().is_terminal() {
        bail!("cowardly refusing to write a tar to a terminal: use -o FILE or a redirect");
    }
    view::export(&c, out).with_context(|| format!("exporting container {name}"))?;
    Ok(())
}

pub fn cp(root: &Path, src: &str, dst: &str) -> Result<()> {
    let side = |s: &str| -> Option<(String, String)> {
        if s.starts_with('/') || s.starts_with('.') {
            return None;
        }
        s.split_once(':')
            .map(|(c, p)| (c.to_string(), p.to_string()))
    };
    match (side(src), side(dst)) {
        (Some((c, p)), None) => {
            let c = container::find(root, &c)?;
            view::copy_out(&c, &p, Path::new(dst))
                .with_context(|| format!("copying {src} to {dst}"))?;
        }
        (None, Some((c, p))) => {
            let c = container::find(root, &c)?;
            view::copy_in(&c, Path::new(src), &p)
                .with_context(|| format!("copying {src} to {dst}"))?;
        }
        (Some(_), Some(_)) => {
            bail!("copying between containers is not supported: copy through the host")
        }
        (None, None) => bail!("one of source and destination must be CONTAINER:PATH"),
    }
    Ok(())
}

fn inspect_container(images: &mut Images, c: &Container) -> Result<Value> {
    let cfg = c.config()?;
    let st = c.state()?;
    let status = container::status_of(&st);
    let snap = images.snapshotter()?;
    let (upper, lowers) = snap.layer_dirs(&c.snapshot_key())?;
    let args = container::strings_of(&cfg["Args"]);
    let mounts: Vec<Value> = cfg["Binds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            json!({
                "Type": b["Type"], "Name": b["Name"], "Source": b["Source"], "Destination": b["Destination"],
                "RW": !b["ReadOnly"].as_bool().unwrap_or(false), "Driver": if b["Type"] == "volume" { json!("local") } else { Value::Null },
            })
        })
        .collect();
    Ok(json!({
        "Id": c.id,
        "Created": cfg["Created"],
        "Path": args.first(),
        "Args": args.get(1..).unwrap_or_default(),
        "State": {
            "Status": status.word(), "Running": status == Status::Running, "Paused": false,
            "Restarting": false, "OOMKilled": false, "Dead": false,
            "Pid": if status == Status::Running { st["Pid"].clone() } else { json!(0) },
            "ExitCode": match status { Status::Exited(c) => json!(c), _ => json!(0) },
            "Error": st["Error"], "StartedAt": st["StartedAt"], "FinishedAt": st["FinishedAt"],
        },
        "Image": cfg["ImageId"],
        "LogPath": c.log_path(),
        "Name": format!("/{}", c.name()),
        "HostConfig": { "AutoRemove": cfg["Rm"], "ReadonlyRootfs": cfg["ReadOnly"], "NetworkMode": cfg["Network"] },
        "GraphDriver": {
            "Name": "strata",
            "Data": {
                "UpperDir": upper, "WorkDir": upper.parent().map(|p| p.join("work")),
                "LowerDir": lowers.iter().map(|l| l.to_string_lossy()).collect::<Vec<_>>().join(":"),
                "MergedDir": c.dir.join("rootfs"),
            },
        },
        "Mounts": mounts,
        "Config": {
            "Hostname": cfg["Hostname"], "User": cfg["User"].as_str().unwrap_or_default(),
            "Tty": cfg["Tty"], "OpenStdin": cfg["OpenStdin"], "Env": cfg["Env"], "Cmd": cfg["Cmd"],
            "Image": cfg["Image"], "WorkingDir": cfg["WorkingDir"], "Entrypoint": cfg["Entrypoint"],
        },
    }))
}

pub fn inspect(root: &Path, kind: Option<&str>, names: &[String]) -> Result<()> {
    let mut images = open(root)?;
    let mut out = Vec::new();
    let mut failed = false;
    for n in names {
        let want = |k: &str| kind.is_none_or(|x| x == k);
        let found: Result<Value> = (|| {
            if want("container") {
                if let Ok(c) = container::find(root, n) {
                    return inspect_container(&mut images, &c);
                }
            }
            if want("image") {
                if let Ok(v) = crate::images::inspect_image(&images, n) {
                    return Ok(v);
                }
            }
            if want("volume") {
                if let Ok(v) = volume::get(root, n) {
                    return Ok(v.inspect());
                }
            }
            bail!("no such object: {n}")
        })();
        match found {
            Ok(v) => out.push(v),
            Err(e) => {
                eprintln!("Error: {e:#}");
                failed = true;
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    if failed {
        bail!("some objects were not found");
    }
    Ok(())
}

pub fn volume(root: &Path, cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create { name, label } => {
            let mut labels = std::collections::BTreeMap::new();
            for l in label {
                let (k, v) = l.split_once('=').unwrap_or((&l, ""));
                labels.insert(k.to_string(), v.to_string());
            }
            let v = volume::create(root, name.as_deref(), labels)?;
            println!("{}", v.name);
        }
        VolumeCommand::Ls { quiet } => {
            let list = volume::list(root)?;
            if quiet {
                for v in list {
                    println!("{}", v.name);
                }
            } else {
                let rows: Vec<[String; 2]> = list
                    .iter()
                    .map(|v| ["local".into(), v.name.clone()])
                    .collect();
                print_table(&["DRIVER", "VOLUME NAME"], &rows);
            }
        }
        VolumeCommand::Inspect { names } => {
            let mut out = Vec::new();
            for n in &names {
                out.push(volume::get(root, n)?.inspect());
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        VolumeCommand::Rm { force, names } => {
            let mut failed = false;
            for n in &names {
                match volume::remove(root, n, force) {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("Error response: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some volumes could not be removed");
            }
        }
        VolumeCommand::Prune { all, force: _ } => {
            let (names, bytes) = volume::prune(root, all)?;
            if !names.is_empty() {
                println!("Deleted Volumes:");
                for n in names {
                    println!("{n}");
                }
                println!();
            }
            println!("Total reclaimed space: {}", human_size(bytes));
        }
    }
    Ok(())
}

/// What `system df` counts, also used by `info`.
struct Usage {
    images: (usize, usize, u64, u64),
    containers: (usize, usize, u64, u64),
    volumes: (usize, usize, u64, u64),
}

fn usage(root: &Path, images: &mut Images) -> Result<Usage> {
    let all_images = images.store.images()?;
    let conts = container::list(root)?;
    let used_ids: std::collections::HashSet<String> = conts
        .iter()
        .filter_map(|c| c.config().ok()?["ImageId"].as_str().map(String::from))
        .collect();
    let mut layer_sizes = std::collections::HashMap::new();
    let mut active_chains = std::collections::HashSet::new();
    let mut active_images = 0;
    for img in &all_images {
        let p = images.parse(img)?;
        let active = used_ids.contains(&img.config.to_string());
        active_images += usize::from(active);
        for ch in Images::chains(&p)? {
            layer_sizes.insert(ch, images.store.layer_size(&ch)?.unwrap_or(0));
            if active {
                active_chains.insert(ch);
            }
        }
    }
    let total: u64 = layer_sizes.values().sum();
    let reclaim: u64 = layer_sizes
        .iter()
        .filter(|(c, _)| !active_chains.contains(*c))
        .map(|(_, s)| s)
        .sum();
    let (mut csize, mut creclaim, mut running) = (0, 0, 0);
    for c in &conts {
        let s = container::commit::rw_size(images, c).unwrap_or(0);
        csize += s;
        if c.status().is_ok_and(|s| s == Status::Running) {
            running += 1;
        } else {
            creclaim += s;
        }
    }
    let vols = volume::list(root)?;
    let (mut vsize, mut vreclaim, mut vactive) = (0, 0, 0);
    for v in &vols {
        let s = v.size();
        vsize += s;
        if volume::users(root, &v.name)?.is_empty() {
            vreclaim += s;
        } else {
            vactive += 1;
        }
    }
    Ok(Usage {
        images: (all_images.len(), active_images, total, reclaim),
        containers: (conts.len(), running, csize, creclaim),
        volumes: (vols.len(), vactive, vsize, vreclaim),
    })
}

pub fn system_df(root: &Path, verbose: bool) -> Result<()> {
    let mut images = open(root)?;
    let u = usage(root, &mut images)?;
    let row = |name: &str, (t, a, s, r): (usize, usize, u64, u64)| {
        let pct = (r * 100).checked_div(s).unwrap_or(0);
        [
            name.to_string(),
            t.to_string(),
            a.to_string(),
            human_size(s),
            format!("{} ({pct}%)", human_size(r)),
        ]
    };
    print_table(
        &["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
        &[
            row("Images", u.images),
            row("Containers", u.containers),
            row("Local Volumes", u.volumes),
        ],
    );
    if verbose {
        println!("\nContainers space usage:\n");
        let mut rows = Vec::new();
        for c in container::list(root)? {
            let cfg = c.config()?;
            rows.push([
                c.id[..12].to_string(),
                cfg["Image"].as_str().unwrap_or_default().to_string(),
                human_size(container::commit::rw_size(&mut images, &c).unwrap_or(0)),
                status_text(&c)?,
                c.name(),
            ]);
        }
        print_table(&["CONTAINER ID", "IMAGE", "SIZE", "STATUS", "NAMES"], &rows);
        println!("\nLocal Volumes space usage:\n");
        let mut rows = Vec::new();
        for v in volume::list(root)? {
            rows.push([
                v.name.clone(),
                volume::users(root, &v.name)?.len().to_string(),
                human_size(v.size()),
            ]);
        }
        print_table(&["VOLUME NAME", "LINKS", "SIZE"], &rows);
    }
    Ok(())
}

pub fn system_prune(root: &Path, all: bool, volumes: bool) -> Result<()> {
    let mut images = open(root)?;
    let mut reclaimed = 0u64;
    let mut gone = Vec::new();
    for c in container::list(root)? {
        if c.status()? != Status::Running {
            reclaimed += container::commit::rw_size(&mut images, &c).unwrap_or(0);
            container::remove(&mut images, root, &c, false, false)?;
            gone.push(c.id);
        }
    }
    if !gone.is_empty() {
        println!("Deleted Containers:");
        for id in gone {
            println!("{id}");
        }
        println!();
    }
    if volumes {
        let (names, bytes) = volume::prune(root, false)?;
        reclaimed += bytes;
        if !names.is_empty() {
            println!("Deleted Volumes:");
            for n in names {
                println!("{n}");
            }
            println!();
        }
    }
    reclaimed += crate::images::prune(root, &mut images, all)?;
    images.snapshotter()?.cleanup()?;
    println!("Total reclaimed space: {}", human_size(reclaimed));
    Ok(())
}

/// The store part of `strata info`; returns the backend its layers mount with (and why), and
/// the form its layers keep deletions in.
pub fn info_store(root: &Path) -> Result<(String, String)> {
    let mut images = open(root)?;
    let u = usage(root, &mut images)?;
    let conts = container::list(root)?;
    let stopped = conts.len() - u.containers.1;
    println!("Containers: {}", conts.len());
    println!(" Running: {}", u.containers.1);
    println!(" Paused: 0");
    println!(" Stopped: {stopped}");
    println!("Images: {}", u.images.0);
    println!("Volumes: {}", u.volumes.0);
    println!("Strata Root Dir: {}", root.display());
    let snap = images.snapshotter()?;
    Ok((snap.backend().to_string(), snap.layer_form().to_string()))
}

pub fn system_check(root: &Path, repair: bool) -> Result<()> {
    let r = strata_runtime::check::check(root, repair)
        .with_context(|| format!("checking the store at {}", root.display()))?;
    println!(
        "checked {} blobs, {} images, {} snapshots, {} containers",
        r.blobs, r.images, r.snapshots, r.containers
    );
    for f in &r.findings {
        println!(
            "{}: {}",
            if f.repaired { "repaired" } else { "problem" },
            f.what
        );
    }
    let left = r.remaining();
    if r.findings.is_empty() {
        println!("no problems");
        return Ok(());
    }
    if left == 0 {
        println!("{} problem(s), all repaired", r.findings.len());
        return Ok(());
    }
    if repair {
        bail!("{left} problem(s) left that --repair cannot fix");
    }
    bail!("{left} problem(s): run `strata system check --repair` to fix what can be fixed");
}
