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
    /// How layers mount: kernel `overlay`, Strata's `fuse` union, or `auto` (kernel overlay
    /// where it mounts on the store's root, FUSE otherwise; the default). Else
    /// STRATA_STORAGE_MODE, else `storage-mode` in $XDG_CONFIG_HOME/strata/config.json.
    #[arg(long, global = true, value_parser = ["overlay", "fuse", "auto"])]
    pub storage_mode: Option<String>,
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `strata_overlay=debug`.
    #[arg(
        long,
        global = true,
        env = "STRATA_LOG",
        default_value = "warn,fuser=error"
    )]
    pub log: String,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach registries.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Allow plain HTTP and unverified HTTPS (for every registry; or list some in
    /// STRATA_INSECURE_REGISTRIES or insecure-registries of $XDG_CONFIG_HOME/strata/config.json).
    #[arg(long)]
    pub insecure: bool,
    /// Credentials file (Docker's config.json format).
    #[arg(long, env = "STRATA_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Layers transferred at once.
    #[arg(long, default_value_t = 3)]
    pub max_concurrent: usize,
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
    /// Run a command in a new container (foreground: exits with its exit code; -d: detached).
    Run(RunArgs),
    /// Create a container without starting it (prints its ID).
    Create(RunArgs),
    /// Start stopped containers.
    Start {
        /// Attach to the container's output and exit with its code.
        #[arg(short, long)]
        attach: bool,
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Stop running containers: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// Seconds to wait before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Stop and start containers again.
    Restart {
        /// Seconds to wait before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to running containers.
    Kill {
        /// The signal (name or number).
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Block until containers stop, then print their exit codes.
    Wait {
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Show a container's output.
    Logs {
        /// Keep following the output until the container stops.
        #[arg(short, long)]
        follow: bool,
        /// Show each line's time.
        #[arg(short, long)]
        timestamps: bool,
        /// Only the last N lines (`all` for everything).
        #[arg(short = 'n', long, default_value = "all")]
        tail: String,
        /// The container.
        container: String,
    },
    /// Run a command in a running container.
    Exec {
        /// Keep stdin open.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a pseudo-terminal.
        #[arg(short, long)]
        tty: bool,
        /// Set an environment variable.
        #[arg(short, long)]
        env: Vec<String>,
        /// Working directory.
        #[arg(short, long)]
        workdir: Option<String>,
        /// User.
        #[arg(short, long)]
        user: Option<String>,
        /// The container.
        container: String,
        /// Command and arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
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
    /// Make a new image from a container's changes.
    Commit {
        /// Commit message.
        #[arg(short, long)]
        message: Option<String>,
        /// Author.
        #[arg(short, long)]
        author: Option<String>,
        /// Apply a Dockerfile instruction to the image config (CMD, ENTRYPOINT, ENV, ...).
        #[arg(short, long)]
        change: Vec<String>,
        /// The container.
        container: String,
        /// The new image's name.
        reference: Option<String>,
    },
    /// Write a container's filesystem as a tar archive.
    Export {
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The container.
        container: String,
    },
    /// Copy files between a container and the host: `CONTAINER:SRC DST` or `SRC CONTAINER:DST`.
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Remove containers.
    Rm {
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
        /// Remove the container's anonymous volumes too.
        #[arg(short, long)]
        volumes: bool,
        /// Containers (names or IDs).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Pull an image from a registry.
    Pull {
        /// The image (`name[:tag][@digest]`).
        reference: String,
        /// Which image of a multi-platform index (os/arch[/variant]; default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Print only the digest.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Push an image to a registry.
    Push {
        /// The image's name, as tagged here (`registry/repository[:tag]`).
        reference: String,
        /// Print only the digest.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Log in to a registry (the credentials are checked, then stored, readable by you only).
    Login {
        /// The registry (`host[:port]`; default docker.io).
        server: Option<String>,
        /// User name.
        #[arg(short, long)]
        username: Option<String>,
        /// Password (prefer --password-stdin: a command line is visible to other users).
        #[arg(short, long)]
        password: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove the stored credentials of a registry.
    Logout {
        /// The registry (`host[:port]`; default docker.io).
        server: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Benchmark CoW I/O against volumes: the same workloads on a plain directory, tmpfs,
    /// kernel overlay, Strata's FUSE union and fuse-overlayfs; report.md, .json and .svg.
    Bench {
        /// Small sizes, for CI (under two minutes).
        #[arg(long)]
        quick: bool,
        /// Interleaved rounds (the median of them is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where the report goes.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Where the scratch data lives (the host file system the volume row measures).
        #[arg(long, default_value = "/var/tmp")]
        dir: PathBuf,
    },
    /// Make a one-layer image from a root filesystem tarball (plain, gzip or zstd).
    Import {
        /// The tarball.
        file: PathBuf,
        /// The image's name.
        reference: Option<String>,
        /// Commit message.
        #[arg(short, long)]
        message: Option<String>,
        /// Apply a Dockerfile instruction to the image config.
        #[arg(short, long)]
        change: Vec<String>,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Disk usage and clean-up.
    #[command(subcommand)]
    System(SystemCommand),
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
    /// Show containers, images or volumes as JSON.
    Inspect {
        /// What to look at: `container`, `image` or `volume` (default: whatever has the name).
        #[arg(long = "type")]
        kind: Option<String>,
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
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
    /// Mount a stack of layers with kernel overlayfs (or Strata's FUSE filesystem).
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
        /// Directory on the backing filesystem to probe (default: the store root, if it exists).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// containerd's snapshotter, served as a proxy plugin.
    #[command(subcommand)]
    Snapshotter(SnapshotterCommand),
    /// Walk through the image and container lifecycle on a base image built from this machine.
    Demo {
        /// Keep the demo's directory instead of removing it.
        #[arg(long)]
        keep: bool,
    },
}

/// `strata image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Remove dangling images (with -a: every image no container uses).
    Prune {
        /// All unused images, not only dangling ones.
        #[arg(short, long)]
        all: bool,
        /// Do not ask (strata never asks; accepted for Docker's scripts).
        #[arg(short, long)]
        force: bool,
    },
    /// List images (as `strata images`).
    Ls(ImagesArgs),
}

/// `strata volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (a random name when none is given).
    Create {
        /// The name.
        name: Option<String>,
        /// A label, `KEY=VALUE`.
        #[arg(short, long)]
        label: Vec<String>,
    },
    /// List volumes.
    Ls {
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show volumes as JSON.
    Inspect {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes (refused while a container uses one).
    Rm {
        /// A missing volume is no error.
        #[arg(short, long)]
        force: bool,
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove unused anonymous volumes (with -a: every unused volume).
    Prune {
        /// Named volumes too.
        #[arg(short, long)]
        all: bool,
        /// Do not ask (accepted for Docker's scripts).
        #[arg(short, long)]
        force: bool,
    },
}

/// `strata system ...`
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Verify every record against the disk and every blob against its digest (exit 1 while
    /// problems remain); --repair fixes what can be fixed. Run it while nothing else changes
    /// the store.
    Check {
        /// Fix what can be fixed.
        #[arg(long)]
        repair: bool,
    },
    /// Disk usage of images, containers and volumes, and what could be reclaimed.
    Df {
        /// One row per image, container and volume.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Remove stopped containers, dangling images (-a: unused ones) and unused layers.
    Prune {
        /// Every unused image, not only dangling ones.
        #[arg(short, long)]
        all: bool,
        /// Unused anonymous volumes too.
        #[arg(long)]
        volumes: bool,
        /// Do not ask (accepted for Docker's scripts).
        #[arg(short, long)]
        force: bool,
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
    /// Check that a layer or upper dir mounts with kernel overlay, or convert its whiteouts
    /// and opaque dirs to another form (kernel: char 0:0 + trusted.overlay.*, userxattr:
    /// char 0:0 + user.overlay.*, wh: OCI .wh. files). Exits 1 if it would not mount.
    Check {
        /// The layer directory.
        dir: PathBuf,
        /// Convert in place to this form: kernel, userxattr or wh.
        #[arg(long)]
        to: Option<String>,
        /// Check against this form instead of the one this user mounts with (kernel as root,
        /// userxattr otherwise).
        #[arg(long = "for", conflicts_with = "to")]
        for_form: Option<String>,
    },
    /// Walk through a layer's lifecycle (apply, mount, change, diff, apply again).
    Demo {
        /// Keep the demo's directory instead of removing it.
        #[arg(long)]
        keep: bool,
    },
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
    /// Mount with `volatile` (no syncs to the upper; with --fuse too). Like kernel overlay,
    /// leaves WORK/work/incompat/volatile, and neither mounts that upper again while it is there.
    #[arg(long)]
    pub volatile: bool,
    /// Read-only.
    #[arg(long)]
    pub ro: bool,
    /// Mount with Strata's FUSE filesystem instead of kernel overlay.
    #[arg(long)]
    pub fuse: bool,
    /// With --fuse: stay in the foreground serving requests (otherwise the server detaches
    /// and the command returns once the mount is live).
    #[arg(short, long, requires = "fuse")]
    pub foreground: bool,
    /// With --fuse: the filesystem's source name (as `mount` shows it).
    #[arg(long, default_value = "strata", requires = "fuse")]
    pub fsname: String,
    /// With --fuse: no set-ID programs run as their owner on the mount (`nosuid`; a root
    /// mount otherwise honours set-ID bits, as kernel overlay does).
    #[arg(long, requires = "fuse")]
    pub nosuid: bool,
    /// With --fuse: device files on the mount cannot be opened (`nodev`).
    #[arg(long, requires = "fuse")]
    pub nodev: bool,
    /// With --fuse: request-handling threads (default: one per CPU, at least 2, at most 16,
    /// each kept on its own CPU; another count leaves them to the scheduler).
    #[arg(long, requires = "fuse")]
    pub threads: Option<usize>,
    /// With --fuse, detached: where the server's log goes once the mount is live (default:
    /// nowhere; before that, errors reach the starting command).
    #[arg(long, requires = "fuse")]
    pub log_file: Option<PathBuf>,
    /// Set by a detaching `mount --fuse` on the server it starts: let go of the starter's
    /// stdio once the mount is live.
    #[arg(long, hide = true)]
    pub detached: bool,
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
        /// How layers are mounted: overlay (kernel overlayfs), fuse (Strata's FUSE union, one
        /// server per snapshot, handed out as bind mounts), or auto (overlay where the kernel
        /// can mount it on this root, FUSE otherwise).
        #[arg(long, default_value = "overlay")]
        mode: String,
        /// FUSE mode: the mount program, with fuse-overlayfs' command line (default: this
        /// binary as strata-fuse; /usr/bin/fuse-overlayfs works too).
        #[arg(long)]
        fuse_helper: Option<PathBuf>,
        /// FUSE mode: leave the FUSE mounts up on shutdown, so running containers keep their
        /// root file systems across a restart of the snapshotter.
        #[arg(long)]
        keep_mounts: bool,
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

/// `strata run` and `strata create`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run in the background and print the container's ID.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep stdin open.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Name the container.
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (`KEY=VALUE`, or `KEY` to pass this one's).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Read environment variables from a file of `KEY=VALUE` lines.
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Override the image's entrypoint (`""` clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// User (`uid[:gid]` or a name from the image's /etc/passwd).
    #[arg(short, long)]
    pub user: Option<String>,
    /// A volume: `NAME:/path[:ro]`, `/host/path:/path[:ro]`, or `/path` (anonymous).
    #[arg(short, long)]
    pub volume: Vec<String>,
    /// A mount: `type=volume|bind|tmpfs,source=..,target=..[,readonly]`.
    #[arg(long)]
    pub mount: Vec<String>,
    /// A tmpfs: `/path[:options]`.
    #[arg(long)]
    pub tmpfs: Vec<String>,
    /// Network: `none` (loopback only, the default) or `host`.
    #[arg(long)]
    pub network: Option<String>,
    /// The image.
    pub image: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}
