//! The `strata` command line (clap), in Docker's vocabulary where Docker has a word.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Strata: a copy-on-write layer store for containers.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, propagate_version = true)]
pub struct Cli {
    /// The store's root (default: /var/lib/strata as root, $XDG_DATA_HOME/strata otherwise).
    #[arg(long, global = true, env = "STRATA_ROOT")]
    pub root: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `strata_overlay=debug`.
    #[arg(long, global = true, env = "STRATA_LOG", default_value = "warn")]
    pub log: String,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load images from an OCI layout archive or a `docker save` archive.
    Load {
        /// The archive.
        #[arg(short, long)]
        input: PathBuf,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a command in a new container (in the foreground; exits with its exit code).
    Run(RunArgs),
    /// List containers.
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Only IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Show the writable layer's size (and the virtual size).
        #[arg(short, long)]
        size: bool,
    },
    /// Show a container's changes to its image: A added, C changed, D deleted.
    Diff {
        /// The container (name or ID).
        container: String,
    },
    /// Remove containers.
    Rm {
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Save images to an OCI image layout archive.
    Save {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Images (references or IDs).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List images.
    Images(ImagesArgs),
    /// Give an image another name.
    Tag {
        /// Source image (reference or ID).
        source: String,
        /// New reference.
        target: String,
    },
    /// Remove images (untag, and delete once no tag is left).
    Rmi {
        /// Remove an image referenced by several tags, by ID.
        #[arg(short, long)]
        force: bool,
        /// Images (references or IDs).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show an image's configuration as JSON.
    Inspect {
        /// Images (references or IDs).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show an image's layers with their size and the command that made them.
    History {
        /// The image.
        image: String,
        /// Only image IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Work with layer blobs and layer directories.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Mount a stack of layers with kernel overlayfs.
    Mount(MountArgs),
    /// Unmount a mount point.
    Umount {
        /// The mount point.
        merged: PathBuf,
        /// Detach lazily (MNT_DETACH) if it is busy.
        #[arg(long)]
        lazy: bool,
    },
    /// Show what the kernel's overlayfs supports here.
    Info {
        /// Directory on the backing filesystem to probe (default: the current directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// containerd's snapshotter, served as a proxy plugin.
    #[command(subcommand)]
    Snapshotter(SnapshotterCommand),
    /// Walk through a layer's lifecycle on an embedded base layer.
    Demo {
        /// Keep the demo's directory instead of removing it.
        #[arg(long)]
        keep: bool,
    },
}

/// `strata layer ...`
#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Apply an OCI layer blob (tar, tar+gzip, tar+zstd) into a new directory, in overlayfs' form.
    Apply(ApplyArgs),
    /// Write a layer blob: natively from an overlay upper dir, or between two trees.
    Diff(DiffArgs),
    /// List changes like `docker diff` (A added, C changed, D deleted).
    Changes(ChangesArgs),
}

/// `strata layer apply`
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The layer blob.
    pub blob: PathBuf,
    /// The directory to create (must not exist, or be empty).
    pub dir: PathBuf,
    /// Rootless form: `user.overlay.opaque`, devices skipped, unmapped owners kept.
    #[arg(long)]
    pub rootless: bool,
    /// Expected diffID (sha256 of the uncompressed tar).
    #[arg(long, value_name = "sha256:..")]
    pub diff_id: Option<String>,
    /// Expected blob digest.
    #[arg(long, value_name = "sha256:..")]
    pub digest: Option<String>,
    /// Cap on the uncompressed size, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,
    /// The complete stack of lower layers this one will sit on, top first, separated by ':'.
    /// Implied directories take their metadata from them, and whiteouts that hide nothing are
    /// dropped.
    #[arg(long, value_name = "L1:L2:..", conflicts_with = "bottom")]
    pub parents: Option<String>,
    /// This is a bottom layer (no parents): whiteouts in it hide nothing and are dropped.
    #[arg(long)]
    pub bottom: bool,
    /// Skip the final syncfs.
    #[arg(long)]
    pub no_sync: bool,
}

/// `strata layer diff`
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// An overlay upper dir (native diff).
    #[arg(required_unless_present = "upper", conflicts_with_all = ["lower", "upper"])]
    pub upper_dir: Option<PathBuf>,
    /// Lower tree of a generic diff.
    #[arg(long, requires = "upper")]
    pub lower: Option<PathBuf>,
    /// Upper tree of a generic diff.
    #[arg(long, requires = "lower")]
    pub upper: Option<PathBuf>,
    /// Lower layers of the upper dir, top first, separated by ':' (needed for uppers mounted
    /// with redirect_dir or metacopy).
    #[arg(long, value_name = "L1:L2:..")]
    pub lowers: Option<String>,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Compression: none, gzip or zstd.
    #[arg(long, default_value = "gzip")]
    pub compress: String,
    /// zstd worker threads.
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
}

/// `strata layer changes`
#[derive(Debug, Args)]
pub struct ChangesArgs {
    /// An overlay upper dir.
    #[arg(required_unless_present = "upper", conflicts_with_all = ["lower", "upper"])]
    pub upper_dir: Option<PathBuf>,
    /// Lower layers of the upper dir, top first, separated by ':' (tells added from changed).
    #[arg(long, value_name = "L1:L2:..")]
    pub lowers: Option<String>,
    /// Lower tree (compare two trees).
    #[arg(long, requires = "upper")]
    pub lower: Option<PathBuf>,
    /// Upper tree (compare two trees).
    #[arg(long, requires = "lower")]
    pub upper: Option<PathBuf>,
}

/// `strata mount`
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Lower layers, top first, separated by ':'.
    #[arg(long, value_name = "L1:L2:..")]
    pub lower: String,
    /// Upper dir (omit for a read-only mount).
    #[arg(long, requires = "work")]
    pub upper: Option<PathBuf>,
    /// Work dir, on the upper's filesystem.
    #[arg(long, requires = "upper")]
    pub work: Option<PathBuf>,
    /// Mount point.
    pub merged: PathBuf,
    /// Use the user.overlay.* xattrs (automatic in a user namespace).
    #[arg(long)]
    pub userxattr: bool,
    /// Turn off metacopy=on and redirect_dir=on even where the kernel has them.
    #[arg(long)]
    pub compat: bool,
    /// Mount with `volatile` (no syncs to the upper).
    #[arg(long)]
    pub volatile: bool,
    /// Read-only.
    #[arg(long)]
    pub ro: bool,
}

/// Splits a ':'-separated list of paths.
pub fn split_paths(s: &str) -> Vec<PathBuf> {
    s.split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// `strata snapshotter ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotterCommand {
    /// Serve containerd.services.snapshots.v1.Snapshots on a unix socket until SIGTERM/SIGINT.
    Serve {
        /// The store's root directory.
        #[arg(long)]
        root: PathBuf,
        /// The unix socket to listen on (created with mode 0660).
        #[arg(long)]
        address: PathBuf,
        /// How layers are mounted: overlay (kernel overlayfs), fuse, or auto.
        #[arg(long, default_value = "overlay")]
        mode: String,
    },
}

/// `strata images`
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Show all images (intermediate ones too).
    #[arg(short, long)]
    pub all: bool,
    /// Only image IDs.
    #[arg(short, long)]
    pub quiet: bool,
    /// Filter: `dangling=true|false`, `reference=PATTERN`.
    #[arg(short, long)]
    pub filter: Vec<String>,
    /// Output format: `table` or `json` (one object a line).
    #[arg(long, default_value = "table")]
    pub format: String,
}

/// `strata run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Name the container.
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (`KEY=VALUE`, or `KEY` to pass this one's).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// User (`uid[:gid]` or a name from the image's /etc/passwd).
    #[arg(short, long)]
    pub user: Option<String>,
    /// The image.
    pub image: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}
