//! `strata`: the command line.

mod bench;
mod cli;
mod containers;
mod images;
mod registries;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use strata_overlay::diff::{self, DiffOptions, LowerView};
use strata_overlay::mount::{Options, Overlay, unmount};
use strata_overlay::{ApplyOptions, Compression, Digest, XattrNs, apply_file, probe};

use cli::{Cli, Command, LayerCommand, SnapshotterCommand, split_paths};

fn main() {
    // The container's own stages (see strata_runtime::container): not part of the CLI.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1].to_string_lossy().starts_with("__") {
        std::process::exit(hidden_stage(
            &args[1].to_string_lossy(),
            Path::new(&args[2]),
        ));
    }
    // Called as `strata-fuse` (a link to this binary): fuse-overlayfs' command line, so
    // Podman's `mount_program` and containerd's `fuse3.` mount helpers can use it.
    let prog = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if prog == "strata-fuse" {
        if let Err(e) = fuse_overlayfs_compat(&args[1..]) {
            eprintln!("strata-fuse: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    // A server (the snapshotter, a FUSE mount) must not die of a closed connection or of its
    // starter closing the pipe of its stderr: only the CLI's own output commands end quietly
    // on a closed pipe.
    if !matches!(cli.command, Command::Snapshotter(_) | Command::Mount(_)) {
        strata_runtime::default_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("strata: error: {e:#}");
        std::process::exit(1);
    }
}

/// `strata __init|__start|__child|__exec|__view DIR`; returns the exit code.
fn hidden_stage(stage: &str, dir: &Path) -> i32 {
    use strata_runtime::container;
    match stage {
        "__init" => container::monitor_main(dir, false),
        "__start" => container::monitor_main(dir, true),
        "__ns" => container::ns_main(dir).unwrap_or_else(|e| {
            eprintln!("strata: container namespaces: {e}");
            125
        }),
        "__child" => {
            let e = container::child_main(dir);
            eprintln!("strata: {e}");
            if matches!(&e, strata_runtime::Error::Io { op: "exec", err, .. } if err.kind() == std::io::ErrorKind::NotFound)
            {
                127
            } else {
                126
            }
        }
        "__exec" => container::exec_main(dir).unwrap_or_else(|e| {
            eprintln!("strata: exec: {e}");
            126
        }),
        "__view" => match container::view::view_main(dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("strata: {e}");
                1
            }
        },
        _ => {
            eprintln!("strata: unknown stage {stage}");
            2
        }
    }
}

/// Commands that mount or change the store: rootless, they run in a user namespace of their
/// own (see strata_runtime::rootless). The others stay in the caller's, from which `exec` and
/// `cp` can join a rootless container's.
fn wants_user_namespace(c: &Command) -> bool {
    !matches!(
        c,
        Command::Exec { .. }
            | Command::Cp { .. }
            | Command::Export { .. }
            | Command::Logs { .. }
            | Command::Wait { .. }
            | Command::Kill { .. }
            | Command::Stop { .. }
            | Command::Layer(_)
            | Command::Mount(_)
            | Command::Umount { .. }
            | Command::Snapshotter(_)
            | Command::Login { .. }
            | Command::Bench { .. }
            | Command::Logout { .. }
    )
}

fn run(cli: Cli) -> Result<()> {
    let root = images::root(cli.root.clone());
    strata_runtime::storage::choose(cli.storage_mode.as_deref())?;
    if wants_user_namespace(&cli.command) && strata_runtime::rootless::needed() {
        strata_runtime::rootless::enter().context("running rootless")?;
    }
    match cli.command {
        Command::Run(a) => containers::run(&root, a),
        Command::Create(a) => containers::create(&root, a),
        Command::Start {
            attach,
            containers: c,
        } => containers::start(&root, &c, attach),
        Command::Stop {
            time,
            containers: c,
        } => containers::stop(&root, &c, time),
        Command::Restart {
            time,
            containers: c,
        } => containers::restart(&root, &c, time),
        Command::Kill {
            signal,
            containers: c,
        } => containers::kill(&root, &c, &signal),
        Command::Wait { containers: c } => containers::wait(&root, &c),
        Command::Logs {
            follow,
            timestamps,
            tail,
            container,
        } => containers::logs(&root, &container, follow, timestamps, &tail),
        Command::Exec {
            interactive,
            tty,
            env,
            workdir,
            user,
            container,
            cmd,
        } => containers::exec(
            &root,
            &container,
            strata_runtime::container::ExecOptions {
                cmd,
                env,
                workdir,
                user,
                interactive,
                tty,
            },
        ),
        Command::Ps { all, quiet, size } => containers::ps(&root, all, quiet, size),
        Command::Rm {
            force,
            volumes,
            containers: c,
        } => containers::rm(&root, &c, force, volumes),
        Command::Diff { container } => containers::diff(&root, &container),
        Command::Commit {
            message,
            author,
            change,
            container,
            reference,
        } => containers::commit(&root, &container, reference, message, author, change),
        Command::Export { output, container } => {
            containers::export(&root, &container, output.as_deref())
        }
        Command::Cp { src, dst } => containers::cp(&root, &src, &dst),
        Command::Bench {
            quick,
            rounds,
            out,
            dir,
        } => bench::run(quick, rounds, &out, &dir),
        Command::Pull {
            reference,
            platform,
            quiet,
            registry,
        } => registries::cmd_pull(&root, &reference, platform.as_deref(), quiet, &registry),
        Command::Push {
            reference,
            quiet,
            registry,
        } => registries::cmd_push(&root, &reference, quiet, &registry),
        Command::Login {
            server,
            username,
            password,
            password_stdin,
            registry,
        } => registries::cmd_login(server, username, password, password_stdin, &registry),
        Command::Logout { server, registry } => registries::cmd_logout(server, &registry),
        Command::Import {
            file,
            reference,
            message,
            change,
        } => images::cmd_import(&root, &file, reference, message, change),
        Command::Image(cli::ImageCommand::Prune { all, force: _ }) => images::cmd_prune(&root, all),
        Command::Image(cli::ImageCommand::Ls(a)) => images::cmd_images(&root, &a),
        Command::Volume(v) => containers::volume(&root, v),
        Command::System(cli::SystemCommand::Check { repair }) => {
            containers::system_check(&root, repair)
        }
        Command::System(cli::SystemCommand::Df { verbose }) => {
            containers::system_df(&root, verbose)
        }
        Command::System(cli::SystemCommand::Prune {
            all,
            volumes,
            force: _,
        }) => containers::system_prune(&root, all, volumes),
        Command::Load { input, quiet } => images::cmd_load(&root, &input, quiet),
        Command::Save {
            output,
            images: names,
        } => images::cmd_save(&root, &output, &names),
        Command::Images(a) => images::cmd_images(&root, &a),
        Command::Tag { source, target } => images::cmd_tag(&root, &source, &target),
        Command::Rmi {
            force,
            images: names,
        } => images::cmd_rmi(&root, &names, force),
        Command::Inspect { kind, names } => containers::inspect(&root, kind.as_deref(), &names),
        Command::History { image, quiet } => images::cmd_history(&root, &image, quiet),
        Command::Layer(LayerCommand::Apply(a)) => layer_apply(a),
        Command::Layer(LayerCommand::Diff(a)) => layer_diff(a),
        Command::Layer(LayerCommand::Changes(a)) => layer_changes(a),
        Command::Layer(LayerCommand::Check { dir, to, for_form }) => {
            layer_check(&dir, to, for_form)
        }
        Command::Layer(LayerCommand::Demo { keep }) => {
            strata_runtime::layer_demo::run(keep, &mut std::io::stdout())
        }
        Command::Mount(a) => mount(a),
        Command::Umount { merged, lazy } => umount(&merged, lazy),
        Command::Info { dir } => info(&root, dir),
        Command::Snapshotter(SnapshotterCommand::Serve {
            root,
            address,
            mode,
            fuse_helper,
            keep_mounts,
        }) => serve_snapshotter(&root, &address, &mode, fuse_helper, keep_mounts),
        Command::Demo { keep } => strata_runtime::demo::run(keep, &mut std::io::stdout()),
    }
}

fn parse_digest(s: Option<&str>, what: &str) -> Result<Option<Digest>> {
    s.map(|s| s.parse::<Digest>().with_context(|| format!("--{what}")))
        .transpose()
}

fn layer_apply(a: cli::ApplyArgs) -> Result<()> {
    let mut opts = if a.rootless {
        ApplyOptions::rootless()
    } else {
        ApplyOptions::default()
    };
    opts.expected_diff_id = parse_digest(a.diff_id.as_deref(), "diff-id")?;
    opts.expected_digest = parse_digest(a.digest.as_deref(), "digest")?;
    if let Some(m) = a.max_size {
        opts.max_size = m;
    }
    opts.parents = match (&a.parents, a.bottom) {
        (Some(p), _) => Some(split_paths(p)),
        (None, true) => Some(Vec::new()),
        (None, false) => None,
    };
    opts.sync = !a.no_sync;
    let r = apply_file(&a.blob, &a.dir, &opts)
        .with_context(|| format!("applying {} into {}", a.blob.display(), a.dir.display()))?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!("diffID: {}", r.diff_id);
    println!("digest: {}", r.digest);
    println!(
        "compression: {}, {} entries, {} bytes uncompressed",
        r.compression, r.entries, r.uncompressed
    );
    Ok(())
}

/// Writes through a temp file beside `out`, renamed into place only on success.
fn write_atomically<T>(
    out: &Path,
    f: impl FnOnce(BufWriter<File>) -> Result<(T, BufWriter<File>)>,
) -> Result<T> {
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a file path", out.display()))?;
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = f(BufWriter::with_capacity(1 << 20, file)).and_then(|(v, mut w)| {
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        Ok(v)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn layer_diff(a: cli::DiffArgs) -> Result<()> {
    let compression: Compression = a.compress.parse()?;
    let opts = DiffOptions {
        compression,
        threads: a.threads,
        lowers: a.lowers.as_deref().map(split_paths).unwrap_or_default(),
    };
    let report = write_atomically(&a.output, |w| {
        Ok(match (&a.upper_dir, &a.lower, &a.upper) {
            (Some(upper), _, _) => diff::native(upper, w, &opts)
                .with_context(|| format!("diffing upper {}", upper.display()))?,
            (None, Some(l), Some(u)) => diff::generic(l, u, w, &opts)
                .with_context(|| format!("diffing {} against {}", u.display(), l.display()))?,
            _ => bail!("give an upper dir, or --lower and --upper"),
        })
    })?;
    println!("diffID: {}", report.diff_id);
    println!("digest: {}", report.digest);
    println!(
        "compression: {}, {} entries, {} bytes ({} uncompressed)",
        report.compression, report.entries, report.size, report.uncompressed
    );
    Ok(())
}

fn layer_check(dir: &Path, to: Option<String>, for_form: Option<String>) -> Result<()> {
    use strata_overlay::form::{self, Form};
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let (report, form) = match to {
        Some(to) => {
            let to: Form = to.parse()?;
            let r = form::convert(dir, to)
                .with_context(|| format!("converting {} to the {to} form", dir.display()))?;
            println!("{}: converted to the {to} form", dir.display());
            (r, to)
        }
        None => {
            let form = match for_form {
                Some(f) => f.parse()?,
                None if nix::unistd::geteuid().is_root() => Form::Kernel,
                None => Form::UserXattr,
            };
            let r = form::check(dir).with_context(|| format!("checking {}", dir.display()))?;
            (r, form)
        }
    };
    println!("{}", report.summary());
    let problems = report.problems(form);
    if problems.is_empty() {
        println!("mountable in the {form} form");
        return Ok(());
    }
    for p in &problems {
        println!("not in the {form} form: {p}");
    }
    std::process::exit(1);
}

fn layer_changes(a: cli::ChangesArgs) -> Result<()> {
    let changes = match (&a.upper_dir, &a.lower, &a.upper) {
        (Some(upper), _, _) => {
            let lowers = LowerView::new(a.lowers.as_deref().map(split_paths).unwrap_or_default());
            diff::changes_native(upper, &lowers)
                .with_context(|| format!("listing changes of {}", upper.display()))?
        }
        (None, Some(l), Some(u)) => diff::changes_generic(l, u)
            .with_context(|| format!("comparing {} with {}", u.display(), l.display()))?,
        _ => bail!("give an upper dir, or --lower and --upper"),
    };
    let mut out = std::io::stdout().lock();
    for c in changes {
        writeln!(out, "{c}")?;
    }
    Ok(())
}

/// `strata mount --fuse`: serves the union of the lowers (and the upper, unless read-only) on
/// the mount point, in the foreground with `-f`, otherwise from a detached copy of this
/// command, returning once the mount is live.
fn mount_fuse(a: cli::MountArgs) -> Result<()> {
    let lowers = split_paths(&a.lower);
    if lowers.is_empty() {
        bail!("--lower needs at least one layer");
    }
    for l in lowers.iter().chain(a.upper.iter()).chain(a.work.iter()) {
        if !l.is_dir() {
            bail!("layer {} is not a directory", l.display());
        }
    }
    if a.foreground {
        use strata_fuse::layer::{Layer, LayerKind, Stack};
        let limit = strata_fuse::fs::raise_open_file_limit()
            .context("raising the open-file limit of the FUSE server")?;
        tracing::debug!(limit, "open files");
        let mut layers: Vec<Layer> = a
            .upper
            .iter()
            .map(|root| Layer {
                root: root.clone(),
                kind: LayerKind::Upper,
            })
            .collect();
        layers.extend(lowers.into_iter().map(|root| Layer {
            root,
            kind: LayerKind::Lower,
        }));
        let stack = Stack::new(layers);
        let read_only = a.upper.is_none() || a.ro;
        let mut union = match (&a.work, read_only) {
            (Some(work), false) => strata_fuse::Union::writable(stack, work.clone()),
            _ => strata_fuse::Union::new(stack),
        };
        if a.volatile {
            union = union.volatile();
        }
        let threads = a
            .threads
            .unwrap_or_else(strata_fuse::threads::default_threads);
        let mut config = strata_fuse::fs::config(&a.fsname, threads, read_only);
        strata_fuse::fs::restrict(&mut config, a.nosuid, a.nodev);
        let (detached, log_file) = (a.detached, a.log_file.clone());
        return strata_fuse::fs::serve_with(union, &a.merged, &config, move || {
            if detached {
                strata_runtime::let_go_of_stdio(log_file.as_deref());
            }
        })
        .with_context(|| format!("serving the FUSE mount on {}", a.merged.display()));
    }
    // Detach: the same command in the foreground, in a session of its own; this returns once
    // the mount is live, or with the server's error.
    let mut args: Vec<std::ffi::OsString> = vec![
        "mount".into(),
        "--fuse".into(),
        "--foreground".into(),
        "--lower".into(),
        a.lower.clone().into(),
        "--fsname".into(),
        a.fsname.clone().into(),
    ];
    if let Some(n) = a.threads {
        args.extend(["--threads".into(), n.to_string().into()]);
    }
    if let (Some(u), Some(w)) = (&a.upper, &a.work) {
        args.extend([
            "--upper".into(),
            u.clone().into(),
            "--work".into(),
            w.clone().into(),
        ]);
    }
    for (on, flag) in [
        (a.ro, "--ro"),
        (a.nosuid, "--nosuid"),
        (a.nodev, "--nodev"),
        (a.volatile, "--volatile"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    if let Some(log) = &a.log_file {
        args.extend(["--log-file".into(), log.clone().into()]);
    }
    args.push("--detached".into());
    args.push(a.merged.clone().into());
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting the FUSE server")?;
    let start = std::time::Instant::now();
    loop {
        if strata_fuse::mounts::is_fuse_mount(&a.merged) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!(
                "the FUSE server exited ({status}) before mounting: {}",
                err.trim().trim_start_matches("strata: error: ")
            );
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            bail!(
                "the FUSE mount on {} did not appear within 10 s",
                a.merged.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `strata-fuse [-f] [-d] -o lowerdir=A:B[,upperdir=U,workdir=W][,fsname=N][,...] MERGED`:
/// fuse-overlayfs' command line. Relative layer paths are taken from the current directory;
/// `ro`, `nosuid`, `nodev` and `volatile` (or `fsync=0`) are honoured; options it does not
/// need (allow_other, default_permissions, squash_to_root, ...) are accepted and ignored, as
/// FUSE mount options are set here anyway.
fn fuse_overlayfs_compat(args: &[std::ffi::OsString]) -> Result<()> {
    let (mut foreground, mut opts, mut merged) = (false, Vec::new(), None);
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" | "-d" | "--foreground" => foreground = true,
            "-o" => opts.extend(
                it.next()
                    .context("-o needs options")?
                    .split(',')
                    .map(String::from)
                    .collect::<Vec<_>>(),
            ),
            o if o.starts_with("-o") => opts.extend(o[2..].split(',').map(String::from)),
            "-h" | "--help" => {
                println!(
                    "usage: strata-fuse [-f] -o lowerdir=A:B[,upperdir=U,workdir=W][,fsname=N] MERGED"
                );
                return Ok(());
            }
            "-V" | "--version" => {
                println!("strata-fuse {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            o if o.starts_with('-') => bail!("unknown option {o}"),
            m => merged = Some(PathBuf::from(m)),
        }
    }
    let cwd = std::env::current_dir()?;
    let abs = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        }
    };
    let (mut lower, mut upper, mut work, mut fsname) =
        (None, None, None, "fuse-overlayfs".to_string());
    let (mut ro, mut nosuid, mut nodev, mut volatile) = (false, false, false, false);
    for o in opts {
        match (o.as_str(), o.split_once('=')) {
            ("ro", _) => ro = true,
            ("nosuid", _) => nosuid = true,
            ("nodev", _) => nodev = true,
            // fuse-overlayfs spells it both ways.
            ("volatile" | "fsync=0", _) => volatile = true,
            (_, Some(("lowerdir", v))) => {
                lower = Some(
                    v.split(':')
                        .filter(|p| !p.is_empty())
                        .map(|p| abs(p).to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(":"),
                )
            }
            (_, Some(("upperdir", v))) => upper = Some(abs(v)),
            (_, Some(("workdir", v))) => work = Some(abs(v)),
            (_, Some(("fsname", v))) => fsname = v.to_string(),
            _ => {}
        }
    }
    let merged = merged.context("no mount point given")?;
    mount(cli::MountArgs {
        lower: lower.context("no lowerdir= given")?,
        work: work.filter(|_| upper.is_some()),
        upper,
        merged: abs(&merged.to_string_lossy()),
        userxattr: false,
        compat: false,
        volatile,
        ro,
        fuse: true,
        foreground,
        fsname,
        nosuid,
        nodev,
        threads: None,
        log_file: None,
        detached: false,
    })
}

fn mount(a: cli::MountArgs) -> Result<()> {
    if a.fuse {
        return mount_fuse(a);
    }
    let probe_dir = a
        .upper
        .clone()
        .unwrap_or_else(|| split_paths(&a.lower).first().cloned().unwrap_or_default());
    let features = probe::probe(probe_dir.parent().unwrap_or(Path::new("/tmp")));
    let mut options: Options = if a.compat {
        Options {
            metacopy: false,
            redirect_dir: false,
            ..features.options()
        }
    } else {
        features.options()
    };
    options.userxattr |= a.userxattr;
    options.volatile = a.volatile;
    options.readonly = a.ro;
    let o = Overlay {
        lowers: split_paths(&a.lower),
        upper: a.upper,
        work: a.work,
        options,
    };
    o.mount(&a.merged)
        .with_context(|| format!("mounting overlay on {}", a.merged.display()))?;
    Ok(())
}

fn umount(merged: &Path, lazy: bool) -> Result<()> {
    if strata_fuse::mounts::is_fuse_mount(merged) {
        return strata_fuse::mounts::unmount(merged, lazy)
            .with_context(|| format!("unmounting {}", merged.display()));
    }
    unmount(merged, lazy).with_context(|| format!("unmounting {}", merged.display()))
}

fn info(root: &Path, dir: Option<PathBuf>) -> Result<()> {
    let backend = if root.is_dir() {
        Some(containers::info_store(root)?)
    } else {
        None
    };
    let dir = match dir {
        Some(d) => d,
        None if root.is_dir() => root.to_path_buf(),
        None => std::env::current_dir()?,
    };
    let (mode, from) = strata_runtime::storage::mode()?;
    println!("Storage Driver: strata");
    println!(" Storage Mode: {mode} (from {from})");
    match backend {
        Some((b, form)) => {
            println!(" Backend: {b}");
            println!(" Layer Form: {form}");
        }
        None => println!(" Backend: chosen when the store is first used (it does not exist yet)"),
    }
    let f = probe::probe(&dir);
    println!("{f}");
    let o = f.options();
    println!(
        " Mount Options: {}",
        Overlay {
            lowers: vec!["L".into()],
            upper: None,
            work: None,
            options: o
        }
        .to_mount()
        .options
        .iter()
        .filter(|s| !s.starts_with("lowerdir") && *s != "ro")
        .cloned()
        .collect::<Vec<_>>()
        .join(",")
    );
    println!(" Native Diff: true (follows redirect_dir and metacopy)");
    println!(
        " Opaque Xattr: {}",
        if f.in_userns {
            XattrNs::User
        } else {
            XattrNs::Trusted
        }
    );
    println!(" Rootless: {}", f.in_userns || nix_euid() != 0);
    Ok(())
}

fn nix_euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn serve_snapshotter(
    root: &Path,
    address: &Path,
    mode: &str,
    fuse_helper: Option<PathBuf>,
    keep_mounts: bool,
) -> Result<()> {
    let config = strata_snapshotter::Config {
        fuse_helper: fuse_helper.map(|program| strata_snapshotter::FuseHelper {
            program,
            arg0: None,
        }),
        // The server owns its root: SQLite locks it once, and Prepare finds its dirs made
        // (durable, under the ids they will get) in the gaps between requests.
        exclusive: true,
        ready_dirs: 4,
        ..strata_snapshotter::Config::new(mode.parse()?)
    };
    let snap = std::sync::Arc::new(
        strata_snapshotter::Snapshotter::open_with(root, config)
            .with_context(|| format!("opening the snapshot store at {}", root.display()))?,
    );
    tracing::info!(backend = snap.backend(), root = %root.display(), "snapshotter ready");
    // One thread does the gRPC work and answers reads inline; everything that blocks (writes,
    // contended reads, FUSE mounts) goes to tokio's blocking pool. Measured against a
    // multi-threaded runtime, this halves the cost of a Stat: no wake-ups across workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before serving, so an early SIGTERM is a clean shutdown too.
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: draining in-flight requests");
        };
        strata_snapshotter::serve(snap.clone(), address, shutdown)
            .await
            .with_context(|| format!("serving on {}", address.display()))
    })?;
    if snap.is_fuse() && !keep_mounts {
        snap.unmount_all().context("unmounting the FUSE mounts")?;
    }
    Ok(())
}
