//! `strata`: the command line.

mod cli;
mod images;

use std::fs::File;
use std::io::{BufWriter, Write};
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
    if args.len() == 3 && (args[1] == "__init" || args[1] == "__child") {
        let dir = PathBuf::from(&args[2]);
        let code = if args[1] == "__init" {
            strata_runtime::container::init_main(&dir).unwrap_or_else(|e| {
                eprintln!("strata: container init: {e}");
                125
            })
        } else {
            let e = strata_runtime::container::child_main(&dir);
            eprintln!("strata: {e}");
            if matches!(&e, strata_runtime::Error::Io { op: "exec", err, .. } if err.kind() == std::io::ErrorKind::NotFound)
            {
                127
            } else {
                126
            }
        };
        std::process::exit(code);
    }
    let cli = Cli::parse();
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

fn run(cli: Cli) -> Result<()> {
    let root = images::root(cli.root.clone());
    match cli.command {
        Command::Run(a) => images::cmd_run(&root, a),
        Command::Ps { all, quiet, size } => images::cmd_ps(&root, all, quiet, size),
        Command::Rm { containers } => images::cmd_rm(&root, &containers),
        Command::Diff { container } => images::cmd_diff(&root, &container),
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
        Command::Inspect { images: names } => images::cmd_inspect(&root, &names),
        Command::History { image, quiet } => images::cmd_history(&root, &image, quiet),
        Command::Layer(LayerCommand::Apply(a)) => layer_apply(a),
        Command::Layer(LayerCommand::Diff(a)) => layer_diff(a),
        Command::Layer(LayerCommand::Changes(a)) => layer_changes(a),
        Command::Mount(a) => mount(a),
        Command::Umount { merged, lazy } => {
            unmount(&merged, lazy).with_context(|| format!("unmounting {}", merged.display()))
        }
        Command::Info { dir } => info(dir),
        Command::Snapshotter(SnapshotterCommand::Serve {
            root,
            address,
            mode,
        }) => serve_snapshotter(&root, &address, &mode),
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

fn mount(a: cli::MountArgs) -> Result<()> {
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

fn info(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::current_dir()?,
    };
    let f = probe::probe(&dir);
    println!("Storage Driver: strata (kernel overlayfs)");
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

fn serve_snapshotter(root: &Path, address: &Path, mode: &str) -> Result<()> {
    let mode: strata_snapshotter::Mode = mode.parse()?;
    let snap = strata_snapshotter::Snapshotter::open(root, mode)
        .with_context(|| format!("opening the snapshot store at {}", root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
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
        strata_snapshotter::serve(std::sync::Arc::new(snap), address, shutdown)
            .await
            .with_context(|| format!("serving on {}", address.display()))
    })
}
