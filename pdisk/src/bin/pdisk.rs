//! `pdisk`: the storage admin's command-line client for pdiskd.
//!
//! A thin shell over the pdisk.v1 gRPC API. [`args`] parses and validates the
//! command line; the handlers here check what is local (label sets, files),
//! then connect and make one call; [`render`] prints the result as a table or
//! as JSON; [`progress`] shows long operations on stderr. [`stratus_core::cli`],
//! shared with agentctl, turns any error into one stderr line and an exit
//! status.

#[path = "pdisk_cli/args.rs"]
mod args;
#[path = "pdisk_cli/images.rs"]
mod images;
#[path = "pdisk_cli/progress.rs"]
mod progress;
#[path = "pdisk_cli/render.rs"]
mod render;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use serde_json::{json, Value};
use stratus_core::cli::{self, Failure, Remote};
use stratus_core::types::{ByteSize, Chap};
use stratus_proto::pdisk::v1::create_volume_request::Source;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use stratus_proto::pdisk::v1::{
    ChapCredentials, ChecksumVolumeRequest, CloneVolumeRequest, CreateSnapshotRequest,
    CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, ExportVolumeRequest,
    FlattenVolumeRequest, GetPoolRequest, GetVolumeRequest, ImageFormat, ImageSource,
    ListExportsRequest, ListSnapshotsRequest, ListVolumesRequest, ResizeVolumeRequest,
    RestoreVolumeRequest, UnexportVolumeRequest, UploadHeader, Volume,
};
use stratus_proto::pdisk::v1::{GetQuotaRequest, ListQuotasRequest, QuotaLimits, SetQuotaRequest};

use args::{
    Cli, CloneArgs, Command, CreateArgs, EventsArgs, ExportAddArgs, ExportCommand, ImageCommand,
    PoolCommand, QuotaCommand, SnapshotCommand, VolumeCommand,
};
use progress::{new_request_id, watched, Client, UploadError};

/// The name that prefixes every error line.
const PROGRAM: &str = "pdisk";

fn main() -> ExitCode {
    cli::docs::write_if_asked("1", Cli::command);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => cli::usage_exit(err),
    };
    let ctx = Ctx {
        remote: Remote::new("the pdisk server", &cli.server, &cli.tls),
        json: cli.json,
        bars: !cli.json && std::io::stderr().is_terminal(),
        project: cli.project.unwrap_or_default(),
    };
    cli::run_to_exit(PROGRAM, ctx.json, run(&ctx, cli.command))
}

/// What every handler needs: where the server is and how to print.
struct Ctx {
    remote: Remote,
    json: bool,
    /// Draw progress bars: stderr is a terminal and the output is not JSON.
    bars: bool,
    /// The project every request acts in ("": the caller's default).
    project: String,
}

impl Ctx {
    /// Connects; called by each handler only after its local checks passed.
    async fn connect(&self) -> Result<Client, Failure> {
        Ok(VolumeServiceClient::new(self.remote.connect().await?))
    }

    fn answer<T>(&self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Failure> {
        self.remote.answer(r)
    }

    /// Prints the result: `json` with --json, else the human form.
    fn print(&self, json: Value, human: impl FnOnce() -> String) -> Result<(), Failure> {
        cli::print(self.json, json, human)
    }

    fn print_volume(&self, v: &Volume) -> Result<(), Failure> {
        self.print(render::volume_json(v), || render::volume_view(v))
    }
}

async fn run(ctx: &Ctx, command: Command) -> Result<(), Failure> {
    // A malformed --server is a usage error, whatever the command.
    ctx.remote.dialer()?;
    match command {
        Command::Volume(c) => volume(ctx, c).await,
        Command::Snapshot(c) => snapshot(ctx, c).await,
        Command::Export(c) => export(ctx, c).await,
        Command::Pool(PoolCommand::Status) => {
            let pool = ctx.answer(ctx.connect().await?.get_pool(GetPoolRequest {}).await)?;
            ctx.print(render::pool_json(&pool), || render::pool_view(&pool))
        }
        Command::Image(c) => image(ctx, c).await,
        Command::Quota(c) => quota(ctx, c).await,
        Command::Events(a) => events(ctx, a).await,
        Command::Usage(a) => usage(ctx, a).await,
    }
}

async fn usage(ctx: &Ctx, a: args::UsageArgs) -> Result<(), Failure> {
    use args::UsageFormat;
    use pdisk::usage::StorageUsageRecord;
    use stratus_proto::pdisk::v1::ListStorageUsageRequest;
    let records: Vec<StorageUsageRecord> = ctx
        .answer(
            ctx.connect()
                .await?
                .list_storage_usage(ListStorageUsageRequest {
                    project: ctx.project.clone(),
                    since: a.since.unwrap_or(0),
                    until: a.until.unwrap_or(0),
                })
                .await,
        )?
        .records
        .into_iter()
        .map(StorageUsageRecord::from)
        .collect();
    let json = serde_json::to_value(&records).expect("records serialize");
    match a.format {
        _ if ctx.json => ctx.print(json, String::new),
        UsageFormat::Json => cli::print(true, json, String::new),
        UsageFormat::Star => ctx.print(json, || pdisk::usage::star_xml(&records)),
        UsageFormat::Csv => ctx.print(json, || pdisk::usage::csv(&records)),
    }
}

/// Writes to stdout; false when the reader went away.
fn emit(bytes: &[u8]) -> Result<bool, Failure> {
    match cli::try_write_stdout(bytes) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure::Local(format!("cannot write the output: {e}"))),
    }
}

fn event_text(ctx: &Ctx, e: &stratus_proto::pdisk::v1::PoolEvent) -> String {
    if ctx.json {
        format!("{}\n", render::event_json(e))
    } else {
        render::event_line(e)
    }
}

/// A core error met on this side (the broker, a payload) as a failure.
fn local(e: stratus_core::error::Error) -> Failure {
    match e.kind() {
        stratus_core::error::ErrorKind::InvalidArgument => Failure::Usage(e.to_string()),
        _ => Failure::Local(e.to_string()),
    }
}

async fn events(ctx: &Ctx, a: EventsArgs) -> Result<(), Failure> {
    let mut interrupted = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure::Local(format!("cannot handle Ctrl-C: {e}")))?;
    if let Some((settings, durable)) = a.nats.settings().map_err(local)? {
        if a.since != 0 {
            return Err(Failure::Usage(
                "--since reads pdiskd's journal; a durable consumer resumes where it left off"
                    .into(),
            ));
        }
        let volume = a.volume.as_ref().map(|v| v.to_string());
        let read = stratus_core::nats::read_durable(
            &settings,
            &durable,
            "stratus.pdisk.>",
            a.follow,
            std::time::Duration::from_secs(2),
            |m| {
                let e = pdisk::events::event_from_payload(&m.payload)?;
                if volume
                    .as_ref()
                    .is_some_and(|v| *v != e.volume_uuid && *v != e.volume_name)
                {
                    return Ok(true);
                }
                emit(event_text(ctx, &e).as_bytes()).map_err(|f| match f {
                    Failure::Local(s) => stratus_core::error::Error::internal(s),
                    other => stratus_core::error::Error::internal(format!("{other:?}")),
                })
            },
        );
        return tokio::select! {
            _ = interrupted.recv() => Ok(()),
            r = read => r.map_err(local),
        };
    }
    let mut client = ctx.connect().await?;
    let mut stream = ctx.answer(
        client
            .watch_events(stratus_proto::pdisk::v1::WatchEventsRequest {
                since_seq: a.since,
                volume: a.volume.map(String::from).unwrap_or_default(),
                no_follow: !a.follow,
                project: ctx.project.clone(),
            })
            .await,
    )?;
    let mut last = a.since;
    loop {
        let message = tokio::select! {
            _ = interrupted.recv() => return Ok(()),
            m = stream.message() => m.map_err(|s| Failure::from_status(s, &ctx.remote))?,
        };
        let Some(e) = message else {
            if !a.follow {
                return Ok(());
            }
            return Err(Failure::Local(format!(
                "pdiskd at {} ended the event stream; resume with --since {last}",
                ctx.remote.url()
            )));
        };
        last = e.seq;
        if !emit(event_text(ctx, &e).as_bytes())? {
            return Ok(());
        }
    }
}

async fn quota(ctx: &Ctx, command: QuotaCommand) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    match command {
        QuotaCommand::Set {
            project,
            volumes,
            snapshots,
            bytes,
        } => {
            let mut limits = QuotaLimits::default();
            let unlimited = stratus_core::cli::args::quota_request([
                ("volumes", volumes, &mut limits.volumes),
                ("snapshots", snapshots, &mut limits.snapshots),
                ("bytes", bytes, &mut limits.bytes),
            ]);
            let q = ctx.answer(
                client
                    .set_quota(SetQuotaRequest {
                        project,
                        limits: Some(limits),
                        unlimited,
                    })
                    .await,
            )?;
            ctx.print(render::quota_json(&q), || render::quota_view(&q))
        }
        QuotaCommand::Show { project } => {
            let project = project.unwrap_or_else(|| ctx.project.clone());
            let q = ctx.answer(client.get_quota(GetQuotaRequest { project }).await)?;
            ctx.print(render::quota_json(&q), || render::quota_view(&q))
        }
        QuotaCommand::List => {
            let qs = ctx
                .answer(client.list_quotas(ListQuotasRequest {}).await)?
                .quotas;
            ctx.print(render::quotas_json(&qs), || render::quotas_table(&qs))
        }
    }
}

fn labels(pairs: &[(String, String)]) -> Result<HashMap<String, String>, Failure> {
    cli::args::label_map(pairs).map_err(Failure::Usage)
}

async fn volume(ctx: &Ctx, command: VolumeCommand) -> Result<(), Failure> {
    match command {
        VolumeCommand::Create(a) => volume_create(ctx, a).await,
        VolumeCommand::List {
            labels: selector,
            quarantined,
        } => {
            let label_selector = labels(&selector)?;
            let mut client = ctx.connect().await?;
            let vs = ctx
                .answer(
                    client
                        .list_volumes(ListVolumesRequest {
                            label_selector,
                            quarantined,
                            project: ctx.project.clone(),
                        })
                        .await,
                )?
                .volumes;
            if quarantined {
                ctx.print(render::volumes_json(&vs), || render::quarantined_table(&vs))
            } else {
                ctx.print(render::volumes_json(&vs), || render::volumes_table(&vs))
            }
        }
        VolumeCommand::Show { volume } => {
            let mut client = ctx.connect().await?;
            let request = GetVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
            };
            let v = ctx.answer(client.get_volume(request).await)?;
            ctx.print_volume(&v)
        }
        VolumeCommand::Delete { volume, now } => {
            let mut client = ctx.connect().await?;
            let request = DeleteVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                now,
                request_id: String::new(),
            };
            let r = ctx.answer(client.delete_volume(request).await)?;
            let quarantined = !r.purge_at.is_empty();
            ctx.print(
                json!({
                    "volume": volume.as_str(),
                    "deleted": true,
                    "quarantined": quarantined,
                    "purge_at": r.purge_at,
                }),
                || {
                    if quarantined {
                        format!(
                            "Deleted volume {volume}: in quarantine until {} \
                             (`pdisk volume restore {volume}` brings it back until then).\n",
                            r.purge_at
                        )
                    } else {
                        format!("Deleted volume {volume}; its data is destroyed.\n")
                    }
                },
            )
        }
        VolumeCommand::Restore { volume, new_name } => {
            let mut client = ctx.connect().await?;
            let request = RestoreVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                new_name: new_name.map(|n| n.to_string()).unwrap_or_default(),
            };
            let v = ctx.answer(client.restore_volume(request).await)?;
            ctx.print_volume(&v)
        }
        VolumeCommand::Resize { volume, size } => {
            let mut client = ctx.connect().await?;
            let request = ResizeVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                size_bytes: size.0,
                request_id: String::new(),
            };
            let v = ctx.answer(client.resize_volume(request).await)?;
            ctx.print_volume(&v)
        }
        VolumeCommand::Clone(a) => volume_clone(ctx, a).await,
        VolumeCommand::Flatten { volume } => {
            let request_id = new_request_id();
            let request = FlattenVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                request_id: request_id.clone(),
            };
            let mut client = ctx.connect().await?;
            let watcher = client.clone();
            let v = ctx.answer(
                watched(
                    &watcher,
                    (&ctx.project, &request_id),
                    ctx.bars,
                    client.flatten_volume(request),
                )
                .await,
            )?;
            ctx.print_volume(&v)
        }
        VolumeCommand::Checksum { volume, snapshot } => {
            let request_id = new_request_id();
            let request = ChecksumVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                is_snapshot: snapshot,
                request_id: request_id.clone(),
            };
            let mut client = ctx.connect().await?;
            let watcher = client.clone();
            let r = ctx.answer(
                watched(
                    &watcher,
                    (&ctx.project, &request_id),
                    ctx.bars,
                    client.checksum_volume(request),
                )
                .await,
            )?;
            let what = volume.to_string();
            ctx.print(
                json!({
                    "object": what,
                    "snapshot": snapshot,
                    "sha256": r.sha256,
                    "size_bytes": r.size_bytes,
                }),
                || format!("{}  {what}\n", r.sha256),
            )
        }
    }
}

async fn volume_create(ctx: &Ctx, a: CreateArgs) -> Result<(), Failure> {
    let labels = labels(&a.labels)?;
    let size_bytes = a.size.map_or(0, |s| s.0);
    let format = a.format.map_or(ImageFormat::Unspecified, Into::into) as i32;
    if let Some(path) = &a.upload {
        let header = UploadHeader {
            project: ctx.project.clone(),
            name: a.name.into(),
            size_bytes,
            labels,
            format,
            content_length: 0,
            request_id: new_request_id(),
        };
        return volume_upload(ctx, header, path).await;
    }
    let source = if let Some(path) = a.from_file {
        Some(Source::FromImage(ImageSource { path, format }))
    } else if let Some(v) = a.from_volume {
        Some(Source::FromVolume(v.to_string()))
    } else {
        a.from_snapshot.map(|s| Source::FromSnapshot(s.to_string()))
    };
    let Some(source) = source else {
        if size_bytes == 0 {
            return Err(Failure::Usage(
                "--size must be greater than 0 for an empty volume".into(),
            ));
        }
        let request = CreateVolumeRequest {
            project: ctx.project.clone(),
            name: a.name.into(),
            size_bytes,
            labels,
            source: None,
            request_id: String::new(),
            allow_multi_attach: a.allow_multi_attach,
        };
        let v = ctx.answer(ctx.connect().await?.create_volume(request).await)?;
        return ctx.print_volume(&v);
    };
    // Imports and copies take time: follow their progress.
    let request_id = new_request_id();
    let request = CreateVolumeRequest {
        project: ctx.project.clone(),
        name: a.name.into(),
        size_bytes,
        labels,
        source: Some(source),
        request_id: request_id.clone(),
        allow_multi_attach: a.allow_multi_attach,
    };
    let mut client = ctx.connect().await?;
    let watcher = client.clone();
    let v = ctx.answer(
        watched(
            &watcher,
            (&ctx.project, &request_id),
            ctx.bars,
            client.create_volume(request),
        )
        .await,
    )?;
    ctx.print_volume(&v)
}

async fn volume_upload(ctx: &Ctx, mut header: UploadHeader, path: &Path) -> Result<(), Failure> {
    let local = |e: std::io::Error| Failure::Usage(format!("cannot read {}: {e}", path.display()));
    let file = tokio::fs::File::open(path).await.map_err(local)?;
    let meta = file.metadata().await.map_err(local)?;
    if meta.is_dir() {
        return Err(Failure::Usage(format!("{} is a directory", path.display())));
    }
    // Devices and pipes have no length up front; the server then counts.
    header.content_length = if meta.is_file() { meta.len() } else { 0 };
    if meta.is_file() && meta.len() == 0 {
        return Err(Failure::Usage(format!("{} is empty", path.display())));
    }
    let mut client = ctx.connect().await?;
    let v = progress::upload(&mut client, header, file, ctx.bars)
        .await
        .map_err(|e| match e {
            UploadError::Server(s) => ctx.remote.failure(s),
            UploadError::Read(e) => {
                Failure::Local(format!("upload cancelled: reading {}: {e}", path.display()))
            }
        })?;
    ctx.print_volume(&v)
}

async fn volume_clone(ctx: &Ctx, a: CloneArgs) -> Result<(), Failure> {
    let request_id = new_request_id();
    let request = CloneVolumeRequest {
        project: ctx.project.clone(),
        source: a.source.to_string(),
        source_is_snapshot: a.from_snapshot,
        name: a.name.into(),
        labels: labels(&a.labels)?,
        size_bytes: a.size.map_or(0, |s: ByteSize| s.0),
        request_id: request_id.clone(),
    };
    let mut client = ctx.connect().await?;
    let watcher = client.clone();
    let v = ctx.answer(
        watched(
            &watcher,
            (&ctx.project, &request_id),
            ctx.bars,
            client.clone_volume(request),
        )
        .await,
    )?;
    ctx.print_volume(&v)
}

async fn snapshot(ctx: &Ctx, command: SnapshotCommand) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    match command {
        SnapshotCommand::Create { volume, name } => {
            let request_id = new_request_id();
            let request = CreateSnapshotRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                name: name.into(),
                request_id: request_id.clone(),
            };
            let watcher = client.clone();
            let call = client.create_snapshot(request);
            let s =
                ctx.answer(watched(&watcher, (&ctx.project, &request_id), ctx.bars, call).await)?;
            ctx.print(render::snapshot_json(&s), || render::snapshot_view(&s))
        }
        SnapshotCommand::List { volume } => {
            let request = ListSnapshotsRequest {
                project: ctx.project.clone(),
                volume: volume.map(|v| v.to_string()).unwrap_or_default(),
            };
            let ss = ctx.answer(client.list_snapshots(request).await)?.snapshots;
            ctx.print(render::snapshots_json(&ss), || render::snapshots_table(&ss))
        }
        SnapshotCommand::Delete { snapshot } => {
            let request = DeleteSnapshotRequest {
                project: ctx.project.clone(),
                snapshot: snapshot.to_string(),
                request_id: String::new(),
            };
            ctx.answer(client.delete_snapshot(request).await)?;
            ctx.print(
                json!({ "snapshot": snapshot.as_str(), "deleted": true }),
                || format!("Deleted snapshot {snapshot}.\n"),
            )
        }
    }
}

async fn image(ctx: &Ctx, command: ImageCommand) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    // Every volume: images are found by label, their clones by source.
    let volumes = ctx
        .answer(client.list_volumes(ListVolumesRequest::default()).await)?
        .volumes;
    let all = images::images(&volumes);
    match command {
        ImageCommand::List => ctx.print(render::images_json(&all), || render::images_table(&all)),
        ImageCommand::Rm { image } => {
            // Refusals found here are worded and coded as pdiskd's own.
            let found = images::resolve(&all, &image).map_err(Failure::Server)?;
            if let Some(refusal) = images::removal_refusal(found) {
                return Err(Failure::Server(refusal));
            }
            // An image base is deleted at once: it is the image, imported
            // again when needed.
            let request = DeleteVolumeRequest {
                project: ctx.project.clone(),
                volume: found.base.uuid.clone(),
                now: false,
                request_id: String::new(),
            };
            ctx.answer(client.delete_volume(request).await)?;
            ctx.print(
                json!({
                    "sha256": found.sha256,
                    "volume": found.base.name,
                    "deleted": true,
                }),
                || {
                    format!(
                        "Deleted image {} (volume {}).\n",
                        found.short_sha(),
                        found.base.name
                    )
                },
            )
        }
    }
}

async fn export(ctx: &Ctx, command: ExportCommand) -> Result<(), Failure> {
    match command {
        ExportCommand::Add(a) => export_add(ctx, a).await,
        ExportCommand::Remove { volume, initiators } => {
            let request = UnexportVolumeRequest {
                project: ctx.project.clone(),
                volume: volume.to_string(),
                initiators: initiators.into_iter().map(String::from).collect(),
                request_id: String::new(),
            };
            let removed = request.initiators.len();
            let mut client = ctx.connect().await?;
            let remaining = ctx.answer(client.unexport_volume(request).await)?.remaining;
            let json = json!({
                "volume": volume.as_str(),
                "remaining": remaining.as_ref().map(render::export_json),
            });
            ctx.print(json, || match &remaining {
                Some(e) => format!(
                    "Removed {removed} initiator(s) from the export of {volume}; it remains:\n{}",
                    render::export_view(e)
                ),
                None => format!("Volume {volume} is no longer exported.\n"),
            })
        }
        ExportCommand::List => {
            let mut client = ctx.connect().await?;
            let es = ctx
                .answer(
                    client
                        .list_exports(ListExportsRequest {
                            project: ctx.project.clone(),
                        })
                        .await,
                )?
                .exports;
            ctx.print(render::exports_json(&es), || render::exports_table(&es))
        }
    }
}

async fn export_add(ctx: &Ctx, a: ExportAddArgs) -> Result<(), Failure> {
    // clap makes --chap-user and --chap-secret-file come together.
    let chap = match (&a.chap_user, &a.chap_secret_file) {
        (Some(user), Some(file)) => {
            let chap = read_chap(user, file)?;
            Some(ChapCredentials {
                user: chap.user.clone(),
                secret: chap.secret().to_owned(),
                target: None,
            })
        }
        _ => None,
    };
    let request = ExportVolumeRequest {
        migration: false,
        host_id: String::new(),
        project: ctx.project.clone(),
        volume: a.volume.to_string(),
        initiators: a.initiators.into_iter().map(String::from).collect(),
        chap,
        multi_attach: a.multi_attach,
        request_id: String::new(),
    };
    let mut client = ctx.connect().await?;
    let e = ctx.answer(client.export_volume(request).await)?;
    ctx.print(render::export_json(&e), || render::export_view(&e))
}

/// The secret stays in a file so it shows in no process list or shell history.
fn read_chap(user: &str, file: &Path) -> Result<Chap, Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Failure::Usage(format!(
            "cannot read the CHAP secret file {}: {e}",
            file.display()
        ))
    })?;
    Chap::new(user, text.trim_end_matches(['\r', '\n'])).map_err(|e| Failure::Usage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_become_json_messages() {
        let err =
            Cli::try_parse_from(["pdisk", "volume", "create", "DB1", "--size", "1G"]).unwrap_err();
        let message = cli::clap_message(&err);
        assert!(
            message.starts_with("invalid value 'DB1' for '<NAME>'"),
            "{message}"
        );
        assert!(
            !message.contains('\u{1b}'),
            "no terminal colours: {message}"
        );
    }

    #[test]
    fn chap_secret_comes_from_a_file_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cretpassw0rd\n").unwrap();
        assert_eq!(
            read_chap("alice", &file).unwrap().secret(),
            "s3cretpassw0rd"
        );
        std::fs::write(&file, "short\r\n").unwrap();
        let err = read_chap("alice", &file).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            !err.line(PROGRAM).contains("short"),
            "the secret is never echoed: {}",
            err.line(PROGRAM)
        );
        assert!(read_chap("alice", &dir.path().join("missing")).is_err());
    }
}
