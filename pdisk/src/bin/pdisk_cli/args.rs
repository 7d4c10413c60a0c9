//! The command line of `pdisk`. Every argument is parsed here into a validated
//! type (names, sizes, IQNs, labels, references), so bad input is refused by
//! clap with exit status 2 before the server is contacted; pdiskd checks again.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use stratus_core::cli::args::{label_arg as parse_label_arg, Limit, Ref};
use stratus_core::error::Error;
use stratus_core::types::{ByteSize, Iqn, VolumeName};
use stratus_proto::pdisk::v1::ImageFormat;

use crate::images::ImageSel;

pub const DEFAULT_SERVER: &str = "unix:/run/stratus/pdiskd.sock";

/// Help heading of the options every command accepts.
const GLOBAL: &str = "Global options";

const EXAMPLES: &str = "\
Examples:
  pdisk volume create db1 --size 20G --label tier=gold
  pdisk volume create base-debian --upload ./debian-12.qcow2
  pdisk volume create base-alpine --from-file /srv/pdisk/import/alpine.raw --format raw
  pdisk snapshot create db1 db1-nightly
  pdisk volume clone db1-nightly db1-test --from-snapshot
  pdisk export add db1 --initiator iqn.2026-11.io.stratus:host1
  pdisk --json volume list --label tier=gold
  pdisk image rm 3f5a9c1e
  pdisk events --follow
  pdisk usage --since 2026-12-01T00:00:00Z --format csv
  pdisk events --from-nats nats://127.0.0.1:4222 --durable storage-ops";

/// Storage admin's client for pdiskd, the persistent-disk service of a Stratus
/// storage host: volumes, snapshots, clones, iSCSI exports and the pool.
///
/// Volumes and snapshots are referred to by name or by UUID. Sizes take binary
/// suffixes (512M, 10G, 1.5T) and are rounded up to a whole MiB.
#[derive(Debug, Parser)]
#[command(name = "pdisk", version, after_help = EXAMPLES)]
pub struct Cli {
    /// pdiskd: unix:/PATH (its local socket), https://HOST:PORT (mTLS with
    /// --cert, --key, --ca; HOST:PORT alone means https), or a loopback
    /// http://HOST:PORT (its --insecure-listen)
    #[arg(
        long,
        global = true,
        env = "PDISK_SERVER",
        hide_env_values = true,
        default_value = DEFAULT_SERVER,
        value_name = "URL",
        help_heading = GLOBAL
    )]
    pub server: String,

    #[command(flatten)]
    pub tls: stratus_core::cli::TlsArgs,

    /// Print the result, or the error, as JSON on stdout (and no progress bars).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// The project to act in: required with a frontend certificate; with a
    /// project certificate, its own (the default); admins and agents act in
    /// every project without it, and create volumes of no project
    #[arg(
        long,
        global = true,
        env = "PDISK_PROJECT",
        value_name = "PROJECT",
        help_heading = GLOBAL
    )]
    pub project: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect, resize, clone and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Read-only, point-in-time copies of volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// iSCSI exports: which initiators may attach which volumes.
    #[command(subcommand)]
    Export(ExportCommand),
    /// The storage pool behind the volumes.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Image base volumes: the volumes Stratus agents import once per image
    /// (labelled stratus.io/image-sha256) and clone for guests' disks.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Per-project quotas: volumes, snapshots and provisioned bytes.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Print the pool's events: replayed from pdiskd's journal, then (with
    /// --follow) live; or from the NATS broker (--from-nats URL --durable NAME).
    Events(EventsArgs),
    /// Storage usage records per project (accounting): each a sample of a
    /// project's volumes and snapshots, with provisioned and allocated
    /// bytes, over the time since its previous sample. As StAR XML (the
    /// EGI storage accounting record), JSON or CSV.
    Usage(UsageArgs),
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// From this time: RFC 3339 (2026-12-01T00:00:00Z) or Unix seconds
    /// [default: the first sample kept]
    #[arg(long, value_name = "TIME", value_parser = stratus_core::cli::args::unix_time)]
    pub since: Option<u64>,

    /// Up to this time [default: now, after sampling every project]
    #[arg(long, value_name = "TIME", value_parser = stratus_core::cli::args::unix_time)]
    pub until: Option<u64>,

    /// star (StAR XML, what APEL loads; `apel` is the same), json or csv.
    #[arg(long, value_enum, default_value_t = UsageFormat::Star)]
    pub format: UsageFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageFormat {
    #[value(alias = "apel")]
    Star,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events after this sequence number (0: all still journaled).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub since: u64,

    /// Only the events of this volume (name or UUID).
    #[arg(long, value_name = "VOLUME")]
    pub volume: Option<Ref>,

    /// After the replay, keep printing live events until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,

    /// From the broker instead of pdiskd.
    #[command(flatten)]
    pub nats: stratus_core::nats::FromNatsArgs,
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Set a project's limits (admins). Limits not given keep their value;
    /// `unlimited` removes one.
    Set {
        /// The project.
        project: String,
        /// Most volumes the project may hold, or `unlimited`.
        #[arg(long, value_parser = Limit::parse_count)]
        volumes: Option<Limit>,
        /// Most snapshots, or `unlimited`.
        #[arg(long, value_parser = Limit::parse_count)]
        snapshots: Option<Limit>,
        /// Most provisioned bytes (volume and snapshot sizes, e.g. 2T), or
        /// `unlimited`.
        #[arg(long, value_parser = Limit::parse_bytes)]
        bytes: Option<Limit>,
    },
    /// A project's limits and usage (a project certificate: its own).
    Show {
        /// The project; defaults to --project.
        project: Option<String>,
    },
    /// Every project with a quota or with volumes (admins).
    List,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: empty, or filled from an image, a volume or a snapshot.
    Create(CreateArgs),
    /// List volumes, optionally only those carrying every given label.
    List {
        /// Only volumes with this label, as KEY=VALUE; repeat to require several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
        /// The deleted volumes in quarantine instead, with their purge times
        /// (`volume restore` brings one back until then).
        #[arg(long)]
        quarantined: bool,
    },
    /// Show one volume in detail.
    Show {
        /// Volume name or UUID.
        volume: Ref,
    },
    /// Delete a volume: it goes to quarantine for pdiskd's quarantine period
    /// (restorable with `volume restore`), then its data is destroyed.
    /// Refused while it is exported or has snapshots.
    Delete {
        /// Volume name or UUID (with --now, also a quarantined volume's UUID).
        volume: Ref,
        /// Destroy the data at once, skipping quarantine (admins only).
        #[arg(long)]
        now: bool,
    },
    /// Bring a deleted volume back from quarantine, before its purge time.
    Restore {
        /// The quarantined volume's UUID, or its name when only one
        /// quarantined volume has it (see `volume list --quarantined`).
        volume: Ref,
        /// Restore under this name (needed when its own name was taken
        /// since it was deleted).
        #[arg(long = "as", value_name = "NAME")]
        new_name: Option<VolumeName>,
    },
    /// Grow a volume. Shrinking is refused.
    Resize {
        /// Volume name or UUID.
        volume: Ref,
        /// New size, larger than the current one (e.g. 40G).
        #[arg(long, value_parser = parse_volume_size)]
        size: ByteSize,
    },
    /// Make a writable copy-on-write clone of a volume or of a snapshot.
    Clone(CloneArgs),
    /// Make a clone independent of the snapshot or image base it was
    /// cloned from (rbd: copies the parent's blocks; file and lvm clones
    /// are independent already), so that parent can be deleted.
    Flatten {
        /// Volume name or UUID.
        volume: Ref,
    },
    /// SHA-256 of a volume's (or, with --snapshot, a snapshot's) whole
    /// content, holes read as zeros: what `sha256sum` of its bytes prints.
    /// Computed on the storage host, with progress.
    Checksum {
        /// Volume name or UUID (a snapshot's with --snapshot).
        volume: Ref,
        /// VOLUME names a snapshot.
        #[arg(long)]
        snapshot: bool,
    },
}

/// Where a new volume's content comes from: at most one source, and `--format`
/// only for image sources.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").args(["from_file", "upload", "from_volume", "from_snapshot"])))]
#[command(group(ArgGroup::new("image").args(["from_file", "upload"])))]
pub struct CreateArgs {
    /// Name of the new volume: lowercase letters, digits, '.', '_' and '-',
    /// starting with a letter or digit, at most 63 characters.
    pub name: VolumeName,

    /// Size of the volume (e.g. 20G). Required for an empty volume; with a
    /// source it defaults to (and 0 means) the source's size, and a larger
    /// size grows the copy.
    #[arg(long, value_parser = parse_size_or_zero, required_unless_present = "source")]
    pub size: Option<ByteSize>,

    /// Label as KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
    pub labels: Vec<(String, String)>,

    /// Import an image file that is already on the storage host: an absolute
    /// path inside one of pdiskd's import directories.
    #[arg(long, value_name = "PATH", value_parser = parse_server_path)]
    pub from_file: Option<String>,

    /// Upload a local image file to the server.
    #[arg(long, value_name = "PATH")]
    pub upload: Option<PathBuf>,

    /// Format of the image given with --from-file or --upload; detected from
    /// its content when omitted.
    #[arg(long, value_enum, requires = "image")]
    pub format: Option<FormatArg>,

    /// Fill the new volume with a copy of this volume (name or UUID).
    #[arg(long, value_name = "VOLUME")]
    pub from_volume: Option<Ref>,

    /// Fill the new volume with a copy of this snapshot (name or UUID).
    #[arg(long, value_name = "SNAPSHOT")]
    pub from_snapshot: Option<Ref>,

    /// Allow exports of this volume to several hosts at once (each with
    /// `export add --multi-attach`).
    #[arg(long)]
    pub allow_multi_attach: bool,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The volume to clone (name or UUID), or a snapshot with --from-snapshot.
    pub source: Ref,

    /// Name of the new volume.
    pub name: VolumeName,

    /// SOURCE names a snapshot rather than a volume.
    #[arg(long)]
    pub from_snapshot: bool,

    /// Grow the clone to this size; by default (or 0) it keeps the source's size.
    #[arg(long, value_parser = parse_size_or_zero)]
    pub size: Option<ByteSize>,

    /// Label as KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume.
    Create {
        /// Volume name or UUID.
        volume: Ref,
        /// Name of the new snapshot (same rules as volume names).
        name: VolumeName,
    },
    /// List snapshots, of one volume or of all.
    List {
        /// Only the snapshots of this volume (name or UUID).
        volume: Option<Ref>,
    },
    /// Delete a snapshot. Refused while clones depend on it.
    Delete {
        /// Snapshot name or UUID.
        snapshot: Ref,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Export a volume over iSCSI, or add initiators to its export.
    Add(ExportAddArgs),
    /// Remove initiators from an export, or the whole export when none are given.
    Remove {
        /// Volume name or UUID.
        volume: Ref,
        /// Initiator IQN to remove; repeat for several. Without any, the
        /// volume is no longer exported.
        #[arg(long = "initiator", value_name = "IQN")]
        initiators: Vec<Iqn>,
    },
    /// List the exports.
    List,
}

#[derive(Debug, Args)]
pub struct ExportAddArgs {
    /// Volume name or UUID.
    pub volume: Ref,

    /// Initiator IQN allowed to log in (iqn.YYYY-MM.domain[:suffix] or
    /// eui.<16 hex digits>); repeat for several.
    #[arg(long = "initiator", value_name = "IQN", required = true)]
    pub initiators: Vec<Iqn>,

    /// One-way CHAP user name; needs --chap-secret-file.
    #[arg(long, value_name = "USER", requires = "chap_secret_file")]
    pub chap_user: Option<String>,

    /// File holding the CHAP secret (12 to 64 printable characters; a trailing
    /// newline is ignored). The secret is never taken on the command line.
    #[arg(long, value_name = "FILE", requires = "chap_user")]
    pub chap_secret_file: Option<PathBuf>,

    /// Also export to this host while another host has the volume (the
    /// volume must allow multi-attach): live migration, clustered file
    /// systems.
    #[arg(long)]
    pub multi_attach: bool,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Capacity, usage, capabilities, exporter health and drift found at the
    /// last reconciliation.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List image base volumes and how many volumes are cloned from each.
    List,
    /// Delete an image's base volume. Refused while volumes cloned from it
    /// exist: delete the clones (the guests using them) first.
    Rm {
        /// The image's sha256, a prefix of it (at least 8 hex digits), or
        /// its base volume's name or UUID.
        image: ImageSel,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> ImageFormat {
        match f {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

/// A non-zero volume size, rounded up to 1 MiB.
fn parse_volume_size(s: &str) -> Result<ByteSize, Error> {
    ByteSize::volume_size(s.parse::<ByteSize>()?.0)
}

/// A volume size where 0 means "the source's size".
fn parse_size_or_zero(s: &str) -> Result<ByteSize, Error> {
    match s.parse::<ByteSize>()? {
        ByteSize(0) => Ok(ByteSize(0)),
        b => ByteSize::volume_size(b.0),
    }
}

/// Paths given with --from-file are resolved by pdiskd, not here.
fn parse_server_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not absolute: --from-file takes a path on the storage host; \
             use --upload for a local file"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pdisk").chain(args.iter().copied()))
    }

    fn fails(args: &[&str]) -> ErrorKind {
        parse(args).expect_err("should be refused").kind()
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let before = parse(&["--json", "--server", "http://h:1", "pool", "status"]).unwrap();
        let after = parse(&["pool", "status", "--json", "--server", "http://h:1"]).unwrap();
        for cli in [before, after] {
            assert!(cli.json);
            assert_eq!(cli.server, "http://h:1");
            assert!(matches!(cli.command, Command::Pool(PoolCommand::Status)));
        }
    }

    #[test]
    fn create_empty_needs_a_size() {
        let cli = parse(&[
            "volume",
            "create",
            "db1",
            "--size",
            "1.5G",
            "--label",
            "tier=gold",
        ])
        .unwrap();
        let Command::Volume(VolumeCommand::Create(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.name.as_str(), "db1");
        assert_eq!(a.size, Some(ByteSize(1536 << 20)));
        assert_eq!(a.labels, vec![("tier".to_owned(), "gold".to_owned())]);
        assert_eq!(
            fails(&["volume", "create", "db1"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn create_sizes_round_up_to_a_mib() {
        let cli = parse(&["volume", "create", "db1", "--size", "1000"]).unwrap();
        let Command::Volume(VolumeCommand::Create(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.size, Some(ByteSize(1 << 20)));
    }

    #[test]
    fn create_from_a_source_takes_the_size_from_it() {
        let cli = parse(&[
            "volume",
            "create",
            "b",
            "--from-file",
            "/srv/i.qcow2",
            "--format",
            "qcow2",
        ])
        .unwrap();
        let Command::Volume(VolumeCommand::Create(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.size, None);
        assert_eq!(a.from_file.as_deref(), Some("/srv/i.qcow2"));
        assert_eq!(a.format, Some(FormatArg::Qcow2));
        assert!(parse(&["volume", "create", "b", "--upload", "x.img"]).is_ok());
        assert!(parse(&["volume", "create", "b", "--from-volume", "a", "--size", "0"]).is_ok());
        assert!(parse(&[
            "volume",
            "create",
            "b",
            "--from-snapshot",
            "s1",
            "--size",
            "2G"
        ])
        .is_ok());
    }

    #[test]
    fn create_takes_one_source_and_format_only_with_an_image() {
        assert_eq!(
            fails(&[
                "volume",
                "create",
                "b",
                "--from-volume",
                "a",
                "--upload",
                "x"
            ]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            fails(&[
                "volume",
                "create",
                "b",
                "--from-volume",
                "a",
                "--format",
                "raw"
            ]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            fails(&["volume", "create", "b", "--upload", "x", "--format", "vmdk"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            fails(&["volume", "create", "b", "--from-file", "relative.img"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn bad_names_sizes_labels_and_iqns_are_usage_errors() {
        for args in [
            &["volume", "create", "DB1", "--size", "1G"][..],
            &["volume", "create", "db1", "--size", "10X"],
            &[
                "volume", "create", "db1", "--size", "1G", "--label", "novalue",
            ],
            &[
                "volume",
                "create",
                "db1",
                "--size",
                "1G",
                "--label",
                "bad key=v",
            ],
            &["volume", "resize", "db1", "--size", "0"],
            &["volume", "show", "../etc"],
            &["export", "add", "db1", "--initiator", "host1"],
            &["export", "remove", "db1", "--initiator", "iqn.2026-13.io.x"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?}"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn clone_from_a_snapshot() {
        let cli = parse(&[
            "volume",
            "clone",
            "snap1",
            "db2",
            "--from-snapshot",
            "--size",
            "50G",
        ])
        .unwrap();
        let Command::Volume(VolumeCommand::Clone(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.source.as_str(), "snap1");
        assert_eq!(a.name.as_str(), "db2");
        assert!(a.from_snapshot);
        assert_eq!(a.size, Some(ByteSize(50 << 30)));
    }

    #[test]
    fn export_add_needs_an_initiator_and_chap_comes_as_a_pair() {
        let cli = parse(&[
            "export",
            "add",
            "db1",
            "--initiator",
            "IQN.2026-11.io.stratus:H1",
            "--initiator",
            "eui.02004567a425678d",
            "--chap-user",
            "alice",
            "--chap-secret-file",
            "/etc/pdisk/secret",
        ])
        .unwrap();
        let Command::Export(ExportCommand::Add(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.initiators[0].as_str(), "iqn.2026-11.io.stratus:h1");
        assert_eq!(a.initiators.len(), 2);
        assert_eq!(a.chap_user.as_deref(), Some("alice"));
        assert_eq!(
            fails(&["export", "add", "db1"]),
            ErrorKind::MissingRequiredArgument
        );
        let iqn = "iqn.2026-11.io.stratus:h1";
        assert_eq!(
            fails(&[
                "export",
                "add",
                "db1",
                "--initiator",
                iqn,
                "--chap-user",
                "alice"
            ]),
            ErrorKind::MissingRequiredArgument
        );
        // There is no way to give the secret itself on the command line.
        assert_eq!(
            fails(&[
                "export",
                "add",
                "db1",
                "--initiator",
                iqn,
                "--chap-secret",
                "s3cretpassw0rd"
            ]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn export_remove_without_initiators_removes_the_export() {
        let cli = parse(&["export", "remove", "db1"]).unwrap();
        let Command::Export(ExportCommand::Remove { volume, initiators }) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(volume.as_str(), "db1");
        assert!(initiators.is_empty());
    }

    #[test]
    fn snapshot_list_volume_is_optional() {
        assert!(matches!(
            parse(&["snapshot", "list"]).unwrap().command,
            Command::Snapshot(SnapshotCommand::List { volume: None })
        ));
        assert!(matches!(
            parse(&["snapshot", "list", "db1"]).unwrap().command,
            Command::Snapshot(SnapshotCommand::List { volume: Some(_) })
        ));
    }

    #[test]
    fn image_rm_takes_a_checksum_prefix_or_a_volume() {
        assert!(matches!(
            parse(&["image", "list", "--json"]).unwrap().command,
            Command::Image(ImageCommand::List)
        ));
        for ok in ["3f5a9c1e", "3F5A9C1E0011", "image-3f5a9c1e00112233"] {
            let cli = parse(&["image", "rm", ok]).unwrap();
            let Command::Image(ImageCommand::Rm { image }) = cli.command else {
                panic!("wrong command")
            };
            assert_eq!(image.to_string(), ok);
        }
        for bad in ["Image-1", "../x", "3F5A9C"] {
            let err = parse(&["image", "rm", bad]).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(err.exit_code(), 2);
        }
        assert_eq!(fails(&["image", "rm"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            fails(&["image", "rm", "3f5a9c1e", "--force"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn missing_subcommand_is_a_usage_error() {
        let err = parse(&["volume"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
