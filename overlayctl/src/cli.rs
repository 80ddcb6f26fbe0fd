//! The command line: one command enum whose doc comments are the help, and each command's
//! options. Parsing only; `run` in the crate root calls one function per command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Manage the layered root filesystem of this device: which layers the next boot mounts, new
/// upgrade layers, rollback, and inspection.
#[derive(Debug, Parser)]
#[command(name = "overlayctl", version, about)]
pub struct Cli {
    /// The store to work on [default: /run/strata/store when booted by Strata, else /strata]
    #[arg(long, global = true, env = "STRATA_STORE", value_name = "PATH")]
    pub store: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Say more about what is being done.
    #[arg(long, short, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the layers, top first: A = in the next boot's stack, C = in the stack mounted now
    /// (the default command).
    Status,
    /// Create a store whose bottom layer is a copy of DIR, active and known-good.
    Init(InitOpts),
    /// Turn this installed system into a store at the next boot, without copying it: the root's
    /// entries become the base layer by rename (the hook does it before mounting), the running
    /// kernel is put where the bootloader starts it, and GRUB's configuration boots it.
    Adopt(AdoptOpts),
    /// The way back from adopt: at the next boot the running stack, with its upper's changes,
    /// becomes the plain root filesystem again (files hard-linked, not copied) and the store is
    /// put aside as STORE.released, to delete once the plain system is fine.
    Release,
    /// Copy DIR into the store as a new layer on top of the stack.
    AddLayer(AddLayerOpts),
    /// Pull an OCI image: its layers become layers in image order (those the store holds are
    /// kept), trial layers on top that stand in for the layers of the stack the image does not
    /// have, so the next boot's stack is the image.
    Pull(PullOpts),
    /// Follow an update channel once (for strata-update.timer): leave out releases pulled
    /// back; take the newest release, when this device is in its rollout, by the bundle that
    /// starts from its system or else the release's image, as a trial layer; say what was done.
    Update(UpdateOpts),
    /// Make and inspect update channels (signed indexes of releases).
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Add the layer that turns the next boot's stack into TARGET, a full tree of the new
    /// system (a directory, a mounted image): new and changed files, deletions as whiteouts,
    /// metadata changes. It becomes a trial layer on top, built on the stack's top.
    Sync(SyncOpts),
    /// Include layers in the stack again (their state becomes active).
    Enable(LayersOpts),
    /// Leave layers out of the stack from the next boot on.
    Disable(LayersOpts),
    /// Accept trial layers. Without names: the trial layers of the running boot, which is then
    /// remembered as the last good stack (run this from a unit after a healthy boot).
    Accept(AcceptOpts),
    /// Assess the running boot after its health checks (for strata-assess.service): when
    /// boot-complete.target was not reached and the boot runs trial layers, restart, so their
    /// tries run out and the next boots leave them out.
    Assess(AssessOpts),
    /// Move this machine to the next boot's stack now, without the firmware and the
    /// bootloader: its kernel is loaded and systemd shuts down and starts it (a kexec).
    Switch(SwitchOpts),
    /// Mark a layer known-good (a fallback, never merged away), or unmark it.
    KnownGood(KnownGoodOpts),
    /// Leave out every layer above LAYER (by default above the highest known-good layer).
    Rollback(RollbackOpts),
    /// Delete a layer from the plan and the store.
    Remove(RemoveOpts),
    /// Assemble a selection of layers with overlayfs at MOUNTPOINT, for inspection or recovery.
    Mount(MountOpts),
    /// Unmount what `overlayctl mount` mounted (and nothing else).
    Umount(UmountOpts),
    /// Recompute layer digests and compare them with the plan, naming the first differing path.
    Verify(VerifyOpts),
    /// Check a plan file and report the first problem with its line and column.
    Check(CheckOpts),
    /// Convert a legacy XO `.overlayplan` into the store's plan.
    ImportLegacy(ImportLegacyOpts),
    /// Make, check and describe update bundles (signed deltas between two trees).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Manage the ed25519 keys bundles are signed with and checked against.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Lock the boot menu with a password (kiosks): without it, only the default boots. The
    /// password is read from the terminal (asked twice, not shown) or from standard input's
    /// first line; the plan keeps only its argon2id hash.
    MenuLock(MenuLockOpts),
    /// Merge a run of adjacent accepted layers into one layer in their place (files hard-linked,
    /// not copied); the old layers are deleted once no mounted stack uses them.
    Compact(CompactOpts),
    /// Apply the plan's [policy]: remove old disabled layers, keep free space above min_free,
    /// merge accepted layers down to max_layers. For a timer.
    Policy(PolicyOpts),
    /// What changes from one stack to another: files, and with --packages the dpkg packages.
    Diff(DiffOpts),
    /// Run a command (a package upgrade, say) in the next boot's stack with a fresh upper, in a
    /// private mount namespace and a chroot: on success its changes become a trial layer, on
    /// failure or Ctrl-C they are discarded.
    Run(RunOpts),
    /// Freeze the running system's persistent upper into a read-only layer at the next boot
    /// (the hook renames it into layers/ before mounting and starts a fresh upper).
    Checkpoint(CheckpointOpts),
    /// (internal) the namespace, mounts and chroot `run` executes the command in.
    #[command(name = "__run-child", hide = true)]
    RunChild(RunChildOpts),
}

#[derive(Debug, Args)]
pub struct RunOpts {
    /// The layer's name [default: run- and the time].
    #[arg(long)]
    pub name: Option<String>,
    /// The layer's title, shown by `status` and the boot menu.
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
    /// Keep what a failed command changed (its upper) and say where, instead of discarding it.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CheckpointOpts {
    /// The layer's name [default: checkpoint- and the time].
    #[arg(long)]
    pub name: Option<String>,
    /// The layer's title, shown by `status` and the boot menu.
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunChildOpts {
    pub scratch: PathBuf,
    #[arg(long = "lower")]
    pub lowers: Vec<PathBuf>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DiffOpts {
    /// The stack with this layer on top (it and the enabled layers below it).
    #[arg(value_name = "A")]
    pub from: String,
    /// The stack with this layer on top.
    #[arg(value_name = "B")]
    pub to: String,
    /// Compare the installed packages of each (var/lib/dpkg/status) instead of files.
    #[arg(long)]
    pub packages: bool,
}

#[derive(Debug, Args)]
pub struct PolicyOpts {
    /// Print the actions, in order, and change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Do nothing unless the store's filesystem has less than the policy's min_free left: a
    /// check cheap enough to run every few minutes (strata-space.timer).
    #[arg(long)]
    pub if_space_low: bool,
}

#[derive(Debug, Args)]
pub struct CompactOpts {
    /// The run's bottom layer [default: the lowest accepted layer above the highest known-good
    /// one].
    #[arg(long, value_name = "LAYER")]
    pub from: Option<String>,
    /// The run's top layer [default: the highest with only accepted layers between it and
    /// --from].
    #[arg(long, value_name = "LAYER")]
    pub to: Option<String>,
    /// The new layer's name [default: TOP+BOTTOM].
    #[arg(long)]
    pub name: Option<String>,
    /// The new layer's title [default: the top layer's title].
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
}

#[derive(Debug, Args)]
pub struct SwitchOpts {
    /// Say what would be started, and load nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct AssessOpts {
    /// Say what would be done, and restart nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct AdoptOpts {
    /// The base layer's name.
    #[arg(long, default_value = "base")]
    pub name: String,
    /// Leave the bootloader's configuration alone (it must boot /boot/strata/default/).
    #[arg(long)]
    pub no_bootloader: bool,
    /// The installed system's root (for building images and tests).
    #[arg(long, default_value = "/", hide = true)]
    pub root: PathBuf,
}

#[derive(Debug, Args)]
pub struct PullOpts {
    /// The image: `oci:DIR[:REF]` (an image layout), `oci-archive:FILE[:REF]`,
    /// `docker-archive:FILE[:REPO:TAG]`, or a registry's `[docker://]REGISTRY/REPO[:TAG]`
    /// or `…@sha256:DIGEST`.
    pub image: String,
    /// Merge the image's layers into one layer.
    #[arg(long)]
    pub squash: bool,
    /// The layer's name with --squash or for an image of one new layer, else the image's
    /// K-th layer is NAME-K [default: the image's name and each layer's digest].
    #[arg(long)]
    pub name: Option<String>,
    /// The title of the one new layer [default: from the image's history].
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
    /// Add the layers as accepted layers, not trial ones.
    #[arg(long)]
    pub active: bool,
    /// Free text kept in the plan.
    #[arg(long)]
    pub notes: Option<String>,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

/// How to reach a registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryOpts {
    /// Speak plain HTTP to the registry (a local one), and check no certificate over HTTPS.
    #[arg(long)]
    pub insecure: bool,
    /// The registry's user and password, USER:PASSWORD [default: from the auth.json `skopeo
    /// login` writes, or Docker's config.json].
    #[arg(
        long,
        env = "STRATA_REGISTRY_CREDS",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    pub creds: Option<String>,
    /// Read credentials from this auth.json.
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

impl RegistryOpts {
    pub fn access(&self) -> crate::oci::registry::Access {
        crate::oci::registry::Access {
            insecure: self.insecure,
            creds: self.creds.clone(),
            authfile: self.authfile.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct InitOpts {
    /// The tree that becomes the base layer.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub base: Option<PathBuf>,
    /// Make the store from an OCI image instead (as `pull` names one): its layers in image
    /// order, the bottom one known-good, all accepted.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// With --image: merge the image's layers into one base layer.
    #[arg(long, requires = "image")]
    pub squash: bool,
    #[command(flatten)]
    pub registry: RegistryOpts,
    /// The base layer's name [default: base; with --image, as `pull` names layers].
    #[arg(long)]
    pub name: Option<String>,
    /// The layer's title, shown by `status` and the boot menu.
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
    /// Rename DIR into the store instead of copying it (same filesystem only).
    #[arg(long = "move", conflicts_with = "image")]
    pub move_base: bool,
}

#[derive(Debug, Args)]
pub struct AddLayerOpts {
    /// The layer: a tree in overlayfs lower format (whiteouts and opaque directories allowed).
    #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
    pub dir: Option<PathBuf>,
    /// Rebuild the layer from a bundle (a file; an http:// or https:// URL; or a registry's
    /// REGISTRY/REPO:TAG as `bundle push` stored it, each downloaded into the store's
    /// downloads/ and resumed where a broken download stopped) against the next boot's stack
    /// instead: its signature is checked against the store's keys/ and its base against the
    /// stack.
    #[arg(long, value_name = "FILE|URL|REF")]
    pub bundle: Option<PathBuf>,
    /// Accept a bundle with no signature from a key in keys/ although keys/ holds keys.
    #[arg(long, requires = "bundle")]
    pub allow_unsigned: bool,
    /// The layer's name [default: DIR's file name]
    #[arg(long)]
    pub name: Option<String>,
    /// The layer's title, shown by `status` and the boot menu.
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
    /// The layer it was built on [default: the current top layer]
    #[arg(long)]
    pub parent: Option<String>,
    /// Add it as a trial layer: it must be accepted within the plan's trial boots (the default).
    #[arg(long, conflicts_with = "active")]
    pub trial: bool,
    /// Add it as an accepted layer.
    #[arg(long)]
    pub active: bool,
    /// Mark it known-good.
    #[arg(long)]
    pub known_good: bool,
    /// Free text kept in the plan.
    #[arg(long)]
    pub notes: Option<String>,
    /// DIR keeps overlay's attributes in the `user.overlay.*` namespace (userxattr).
    #[arg(long)]
    pub userxattr: bool,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

#[derive(Debug, Args)]
pub struct SyncOpts {
    /// The whole new system's tree.
    pub target: PathBuf,
    /// The layer's name [default: TARGET's file name]
    #[arg(long)]
    pub name: Option<String>,
    /// The layer's title, shown by `status` and the boot menu.
    #[arg(long, value_parser = parse_title)]
    pub title: Option<String>,
    /// Compare file contents by hash, not by size and modification time alone.
    #[arg(long)]
    pub checksum: bool,
    /// Only compare and report what the layer would hold; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Free text kept in the plan.
    #[arg(long)]
    pub notes: Option<String>,
}

#[derive(Debug, Args)]
pub struct LayersOpts {
    /// Layer names.
    #[arg(required = true, value_name = "LAYER")]
    pub layers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AcceptOpts {
    #[arg(value_name = "LAYER")]
    pub layers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KnownGoodOpts {
    pub layer: String,
    /// Remove the mark instead.
    #[arg(long)]
    pub unset: bool,
}

#[derive(Debug, Args)]
pub struct RollbackOpts {
    /// The layer that becomes the top.
    #[arg(long, value_name = "LAYER")]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct RemoveOpts {
    #[arg(required_unless_present = "upper", conflicts_with = "upper")]
    pub layer: Option<String>,
    /// Remove the archived upper `uppers/ID` instead (see `status`), with what it holds.
    #[arg(long, value_name = "ID")]
    pub upper: Option<String>,
    /// Remove it even though enabled layers above were built on it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct MountOpts {
    pub mountpoint: PathBuf,
    /// Mount the stack with LAYER on top (what `strata.top=` would boot).
    #[arg(long, value_name = "LAYER", conflicts_with = "layers")]
    pub top: Option<String>,
    /// Mount exactly these layers, in plan order.
    #[arg(long, value_name = "A,B,…", value_delimiter = ',')]
    pub layers: Option<Vec<String>>,
    /// Use the archived or current persistent upper `uppers/ID` (changes go into it); an
    /// archived one goes over the stack it was used over unless --top or --layers says otherwise.
    #[arg(long, value_name = "ID", conflicts_with_all = ["tmpfs_upper", "read_only"])]
    pub upper: Option<String>,
    /// Put changes in a throw-away tmpfs upper.
    #[arg(long, conflicts_with = "read_only")]
    pub tmpfs_upper: bool,
    /// Mount read-only, with no upper (the default).
    #[arg(long)]
    pub read_only: bool,
}

#[derive(Debug, Args)]
pub struct UmountOpts {
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyOpts {
    /// One layer [default: every layer]
    pub layer: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckOpts {
    /// The plan to check [default: the store's overlayplan.toml]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportLegacyOpts {
    /// The legacy plan (`[Layers]` with `name="Title",ro` lines, top first).
    pub file: PathBuf,
    /// Replace a plan the store already has (it is kept as overlayplan.toml.prev).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write the bundle that turns the tree OLD into the tree NEW.
    Create {
        /// What devices have now: a tree, or a Strata store (its next boot's stack, or the
        /// stack under --from-layer).
        #[arg(long, value_name = "OLD")]
        from: PathBuf,
        /// With a store as OLD: the layer devices have on top (the stack is it and the enabled
        /// layers below it).
        #[arg(long, value_name = "LAYER")]
        from_layer: Option<String>,
        /// The new system's tree.
        #[arg(long, value_name = "NEW")]
        to: PathBuf,
        /// The bundle file to write (never over an existing file).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Sign it with this secret key (from `overlayctl keys generate`).
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
    },
    /// Store a bundle in a registry as an OCI artifact (its own media type, its signatures
    /// inside), under REGISTRY/REPO:TAG; `add-layer --bundle REGISTRY/REPO:TAG` fetches it.
    Push {
        file: PathBuf,
        #[arg(value_name = "REGISTRY/REPO:TAG")]
        reference: String,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Check a bundle: its structure, its signatures, and every whole file's content.
    Verify { file: PathBuf },
    /// Show a bundle's base and target, size, entries and signers.
    Info { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct UpdateOpts {
    /// The channel: an http(s) URL, a registry's REGISTRY/REPO:TAG, or a file of a signed
    /// channel document.
    #[arg(long, env = "STRATA_CHANNEL", value_name = "URL|REF|FILE")]
    pub channel: String,
    /// Say what would be done, and change nothing.
    #[arg(long)]
    pub check: bool,
    /// The machine id the rollout is decided by [default: /etc/machine-id].
    #[arg(long, value_name = "HEX")]
    pub machine_id: Option<String>,
    /// Follow a channel that no key in keys/ signed.
    #[arg(long)]
    pub allow_unsigned: bool,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Sign a channel index (JSON: channel, serial, releases) into the document devices read.
    Sign {
        index: PathBuf,
        /// The secret key (from `overlayctl keys generate`).
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
        /// The signed document to write (never over an existing file).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// The tree digest of DIR (a release's whole system), as a channel names releases; without
    /// DIR, of the store's next boot.
    Tree { dir: Option<PathBuf> },
    /// Read a channel, check its signatures against keys/, and show its releases.
    Show {
        #[arg(value_name = "URL|REF|FILE")]
        channel: String,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Store a signed channel document in a registry as an OCI artifact, under
    /// REGISTRY/REPO:TAG, for devices to follow (`update --channel REGISTRY/REPO:TAG`).
    Push {
        file: PathBuf,
        #[arg(value_name = "REGISTRY/REPO:TAG")]
        reference: String,
        #[command(flatten)]
        registry: RegistryOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new signing key: FILE (secret, mode 0600, for the build server) and FILE.pub.
    Generate {
        /// The secret key's file; the public key goes to FILE.pub.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Trust a public key for bundles: copied into the store's keys/ as NAME.pub.
    Add {
        file: PathBuf,
        /// [default: FILE's name without .pub]
        #[arg(long)]
        name: Option<String>,
    },
    /// List the trusted keys.
    List,
    /// Stop trusting a key.
    Remove { name: String },
}

#[derive(Debug, Args)]
pub struct MenuLockOpts {
    /// Remove the lock instead.
    #[arg(long)]
    pub clear: bool,
}

/// A layer title from the command line: printable text only (no escape sequences or other
/// control characters, which would reach every terminal `status` and the boot menu draw on).
fn parse_title(text: &str) -> Result<String, String> {
    match text.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "the title has the control character {:?}; a title is one line of printable text",
            c
        )),
        None => Ok(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["overlayctl", "--store", "/s", "--json"]).unwrap();
        assert!(cli.command.is_none() && cli.json);
        assert_eq!(cli.store.as_deref(), Some(Path::new("/s")));
        let cli =
            Cli::try_parse_from(["overlayctl", "import-legacy", "x.plan", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::ImportLegacy(ImportLegacyOpts { force: true, .. }))
        ));
        let cli = Cli::try_parse_from(["overlayctl", "mount", "/mnt", "--layers", "a,b"]).unwrap();
        let Some(Command::Mount(m)) = cli.command else {
            panic!()
        };
        assert_eq!(m.layers, Some(vec!["a".to_owned(), "b".to_owned()]));
        let cli = Cli::try_parse_from([
            "overlayctl",
            "add-layer",
            "/tmp/up-1",
            "--active",
            "--known-good",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::AddLayer(AddLayerOpts {
                active: true,
                known_good: true,
                ..
            }))
        ));
        for bad in [
            &["overlayctl", "bogus"][..],
            &["overlayctl", "import-legacy"],
            &["overlayctl", "add-layer", "d", "--trial", "--active"],
            &["overlayctl", "mount", "/m", "--top", "a", "--layers", "b"],
            &["overlayctl", "mount", "/m", "--tmpfs-upper", "--read-only"],
            &["overlayctl", "disable"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
