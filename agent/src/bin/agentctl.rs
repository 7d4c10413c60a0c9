//! `agentctl`: the operator's command-line client for agentd, the agent that
//! runs the guests of one host.
//!
//! A thin shell over the agent.v1 gRPC API, with the same conventions as the
//! `pdisk` CLI (shared in [`stratus_core::cli`]): a global `--json`, one stderr line
//! per failure and exit status 1 or 2. [`args`] parses and validates the
//! command line; the handlers here connect and make the call; [`render`]
//! prints the result as text or JSON; [`console`] reads serial logs, which
//! are files on this host, the agent's.

#[path = "agentctl_cli/args/mod.rs"]
mod args;
#[path = "agentctl_cli/console.rs"]
mod console;
#[path = "agentctl_cli/render/mod.rs"]
mod render;

use std::future::Future;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use stratus_core::cli::{self, Failure, Remote};
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::agent::v1::{
    AttachDiskRequest, AttachNicRequest, CreateVmRequest, DestroyVmRequest, DetachDiskRequest,
    DetachNicRequest, EventType, EvictImageRequest, GetHostRequest, ListImagesRequest,
    ListVmsRequest, MigrateVmRequest, ResizeDiskRequest, SaveImageRequest, SetDiskQosRequest,
    StopVmRequest, Vm, VmRequest, VmState, WatchEventsRequest,
};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic::transport::Channel;

use args::{
    Cli, Command, DiskCommand, EventsArgs, HostCommand, ImageCommand, NicCommand, QuotaCommand,
    RmArgs, VmCommand,
};
use console::{Tail, TerminalFilter, Utf8Chunks};
use stratus_core::cli::args::Ref;

/// The name that prefixes every error line.
const PROGRAM: &str = "agentctl";

/// How failures name the server.
const SERVER: &str = "the agent";

/// How often `vm console --follow` looks for new output, and how often it
/// asks whether the VM still runs.
const CONSOLE_POLL: Duration = Duration::from_millis(200);
const STATE_POLL: Duration = Duration::from_secs(1);

type Client = VmServiceClient<Channel>;

fn main() -> ExitCode {
    cli::docs::write_if_asked("1", Cli::command);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => cli::usage_exit(err),
    };
    let ctx = Ctx {
        remote: Remote::new(SERVER, &cli.agent, &cli.tls),
        json: cli.json,
        spinners: !cli.json && std::io::stderr().is_terminal(),
        project: cli.project.unwrap_or_default(),
    };
    cli::run_to_exit(PROGRAM, ctx.json, run(&ctx, cli.command))
}

/// What every handler needs: where the agent is and how to print.
struct Ctx {
    remote: Remote,
    json: bool,
    /// Draw spinners: stderr is a terminal and the output is not JSON.
    spinners: bool,
    /// The project every request acts in ("": the caller's default).
    project: String,
}

impl Ctx {
    /// Connects; called by each handler only after its local checks passed.
    async fn connect(&self) -> Result<Client, Failure> {
        Ok(VmServiceClient::new(self.remote.connect().await?))
    }

    fn answer<T>(&self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Failure> {
        self.remote.answer(r)
    }

    /// Prints the result: `json` with --json, else the human form.
    fn print(&self, json: Value, human: impl FnOnce() -> String) -> Result<(), Failure> {
        cli::print(self.json, json, human)
    }

    fn print_vm(&self, v: &Vm) -> Result<(), Failure> {
        self.print(render::vm_json(v), || render::vm_view(v))
    }

    /// Awaits `call` under a spinner on stderr (when spinners are on): the
    /// agent answers start, stop and destroy only once the guest got there,
    /// and an image pull once the image is verified in the cache.
    async fn waiting<F: Future>(&self, message: String, call: F) -> F::Output {
        if !self.spinners {
            return call.await;
        }
        let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        spinner.set_message(message);
        spinner.enable_steady_tick(Duration::from_millis(120));
        let out = call.await;
        spinner.finish_and_clear();
        out
    }
}

async fn run(ctx: &Ctx, command: Command) -> Result<(), Failure> {
    // A malformed --agent is a usage error, whatever the command.
    ctx.remote.dialer()?;
    match command {
        Command::Vm(c) => vm(ctx, c).await,
        Command::Events(a) => events(ctx, a).await,
        Command::Image(c) => image(ctx, c).await,
        Command::Host(HostCommand::Show) => {
            let host = ctx.answer(ctx.connect().await?.get_host(GetHostRequest {}).await)?;
            ctx.print(render::host_json(&host), || render::host_view(&host))
        }
        Command::Quota(c) => quota(ctx, c).await,
        Command::Usage(a) => usage(ctx, a).await,
    }
}

async fn usage(ctx: &Ctx, a: args::UsageArgs) -> Result<(), Failure> {
    use agent::usage::UsageRecord;
    use args::UsageFormat;
    use stratus_proto::agent::v1::ListUsageRecordsRequest;
    let records: Vec<UsageRecord> = ctx
        .answer(
            ctx.connect()
                .await?
                .list_usage_records(ListUsageRecordsRequest {
                    project: ctx.project.clone(),
                    since: a.since.unwrap_or(0),
                    until: a.until.unwrap_or(0),
                    vm: a.vm.map(|v| v.to_string()).unwrap_or_default(),
                })
                .await,
        )?
        .records
        .into_iter()
        .map(UsageRecord::from)
        .collect();
    let json = serde_json::to_value(&records).expect("records serialize");
    match a.format {
        _ if ctx.json => ctx.print(json, String::new),
        UsageFormat::Json => cli::print(true, json, String::new),
        UsageFormat::Apel => ctx.print(json, || agent::usage::apel_message(&records)),
        UsageFormat::Csv => ctx.print(json, || agent::usage::csv(&records)),
    }
}

async fn quota(ctx: &Ctx, command: QuotaCommand) -> Result<(), Failure> {
    use stratus_proto::agent::v1::{
        GetQuotaRequest, ListQuotasRequest, QuotaLimits, SetQuotaRequest,
    };
    let mut client = ctx.connect().await?;
    match command {
        QuotaCommand::Set {
            project,
            vms,
            vcpus,
            memory,
        } => {
            let mut limits = QuotaLimits::default();
            let unlimited = stratus_core::cli::args::quota_request([
                ("vms", vms, &mut limits.vms),
                ("vcpus", vcpus, &mut limits.vcpus),
                ("memory_bytes", memory, &mut limits.memory_bytes),
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

impl Ctx {
    fn request(&self, vm: &Ref) -> VmRequest {
        VmRequest {
            request_id: String::new(),
            vm: vm.to_string(),
            project: self.project.clone(),
        }
    }
}

async fn vm(ctx: &Ctx, command: VmCommand) -> Result<(), Failure> {
    match command {
        VmCommand::Create(a) => {
            let cwd = std::env::current_dir().map_err(|e| {
                Failure::Local(format!(
                    "cannot resolve relative paths: no working directory: {e}"
                ))
            })?;
            let spec = a.spec(&cwd).map_err(Failure::Usage)?;
            let request = CreateVmRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                spec: Some(spec),
            };
            let v = ctx.answer(ctx.connect().await?.create_vm(request).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Start { vm } => {
            let mut client = ctx.connect().await?;
            let call = client.start_vm(ctx.request(&vm));
            let v = ctx.answer(ctx.waiting(format!("starting {vm}"), call).await)?;
            if v.state == VmState::Error as i32 {
                let reason = if v.state_reason.is_empty() {
                    "the agent gave no reason"
                } else {
                    &v.state_reason
                };
                return Err(Failure::Local(format!(
                    "vm {} did not start: {reason}",
                    v.name
                )));
            }
            ctx.print_vm(&v)
        }
        VmCommand::Stop { vm, timeout, force } => {
            let mut client = ctx.connect().await?;
            let call = client.stop_vm(StopVmRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                timeout_seconds: timeout,
                force,
            });
            let v = ctx.answer(ctx.waiting(format!("stopping {vm}"), call).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Reboot { vm } => {
            let v = ctx.answer(ctx.connect().await?.reboot_vm(ctx.request(&vm)).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Pause { vm } => {
            let v = ctx.answer(ctx.connect().await?.pause_vm(ctx.request(&vm)).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Resume { vm } => {
            let v = ctx.answer(ctx.connect().await?.resume_vm(ctx.request(&vm)).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Disk(DiskCommand::Attach { vm, disk, qos }) => {
            let disk = args::attach_disk_spec(&disk, &qos).map_err(Failure::Usage)?;
            let mut client = ctx.connect().await?;
            let call = client.attach_disk(AttachDiskRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                disk: Some(disk),
            });
            let v = ctx.answer(ctx.waiting(format!("attaching a disk to {vm}"), call).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Disk(DiskCommand::Detach {
            vm,
            device,
            timeout,
        }) => {
            let mut client = ctx.connect().await?;
            let call = client.detach_disk(DetachDiskRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                device: device.clone(),
                timeout_seconds: timeout,
            });
            let v = ctx.answer(
                ctx.waiting(format!("detaching {device} from {vm}"), call)
                    .await,
            )?;
            ctx.print_vm(&v)
        }
        VmCommand::Disk(DiskCommand::Resize { vm, device, size }) => {
            let mut client = ctx.connect().await?;
            let call = client.resize_disk(ResizeDiskRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                device: device.clone(),
                size_bytes: size.0,
            });
            let v = ctx.answer(
                ctx.waiting(format!("resizing {device} of {vm}"), call)
                    .await,
            )?;
            ctx.print_vm(&v)
        }
        VmCommand::Disk(DiskCommand::Qos { vm, device, limits }) => {
            let qos = limits.qos().map_err(Failure::Usage)?.to_pb();
            let mut client = ctx.connect().await?;
            let call = client.set_disk_qos(SetDiskQosRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                device: device.clone(),
                qos: Some(qos),
            });
            let v = ctx.answer(
                ctx.waiting(format!("setting the limits of {device} of {vm}"), call)
                    .await,
            )?;
            ctx.print_vm(&v)
        }
        VmCommand::Nic(NicCommand::Attach { vm, nic }) => {
            let mut client = ctx.connect().await?;
            let call = client.attach_nic(AttachNicRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                nic: Some(args::attach_nic_spec(&nic)),
            });
            let v = ctx.answer(ctx.waiting(format!("attaching a NIC to {vm}"), call).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::Nic(NicCommand::Detach { vm, nic, timeout }) => {
            let mut client = ctx.connect().await?;
            let call = client.detach_nic(DetachNicRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                nic: nic.clone(),
                timeout_seconds: timeout,
            });
            let v = ctx.answer(
                ctx.waiting(format!("detaching NIC {nic} from {vm}"), call)
                    .await,
            )?;
            ctx.print_vm(&v)
        }
        VmCommand::Migrate { vm, to } => migrate(ctx, vm, to).await,
        VmCommand::Destroy { vm, timeout } => {
            let mut client = ctx.connect().await?;
            let call = client.destroy_vm(DestroyVmRequest {
                request_id: String::new(),
                project: ctx.project.clone(),
                vm: vm.to_string(),
                timeout_seconds: timeout,
            });
            ctx.answer(ctx.waiting(format!("destroying {vm}"), call).await)?;
            ctx.print(json!({ "vm": vm.as_str(), "destroyed": true }), || {
                format!("Destroyed vm {vm}.\n")
            })
        }
        VmCommand::Save {
            vm,
            disk,
            image,
            wait,
        } => {
            let mut client = ctx.connect().await?;
            let since = ctx
                .answer(client.get_host(GetHostRequest {}).await)?
                .last_event_seq;
            let saved = ctx.answer(
                client
                    .save_image(SaveImageRequest {
                        request_id: String::new(),
                        project: ctx.project.clone(),
                        vm: vm.to_string(),
                        device: disk.clone(),
                        name: image.clone(),
                    })
                    .await,
            )?;
            if !wait {
                return ctx.print(
                    json!({ "url": saved.url, "volume": saved.volume, "sha256": null }),
                    || {
                        format!(
                            "Saving {vm} {disk} as {}; IMAGE_SAVED in `agentctl events` gives its sha256.\n",
                            saved.url
                        )
                    },
                );
            }
            let stream = client.watch_events(WatchEventsRequest {
                project: ctx.project.clone(),
                since_seq: since,
                vm: String::new(),
                no_follow: false,
            });
            let mut events = ctx.answer(stream.await)?;
            let wanted = format!("pdisk:///{image}");
            let done = ctx
                .waiting(format!("saving {vm} {disk} as {wanted}"), async {
                    loop {
                        match events.message().await {
                            Ok(Some(e)) => {
                                let ours = e.detail.starts_with(&wanted);
                                if ours && e.r#type() == EventType::ImageSaved {
                                    return Ok(Ok(e));
                                }
                                if ours && e.r#type() == EventType::ImageSaveFailed {
                                    return Ok(Err(e.detail));
                                }
                            }
                            Ok(None) => {
                                return Err(tonic::Status::unavailable("event stream ended"))
                            }
                            Err(s) => return Err(s),
                        }
                    }
                })
                .await;
            match ctx.answer(done.map(tonic::Response::new))? {
                Ok(e) => ctx.print(
                    json!({ "url": saved.url, "volume": saved.volume, "sha256": e.image_sha256 }),
                    || {
                        format!(
                            "Saved {vm} {disk} as {} sha256={}\n",
                            saved.url, e.image_sha256
                        )
                    },
                ),
                Err(why) => Err(Failure::Local(format!("saving failed: {why}"))),
            }
        }
        VmCommand::Show { vm } => {
            let v = ctx.answer(ctx.connect().await?.get_vm(ctx.request(&vm)).await)?;
            ctx.print_vm(&v)
        }
        VmCommand::List => {
            let vs = ctx
                .answer(
                    ctx.connect()
                        .await?
                        .list_vms(ListVmsRequest {
                            project: ctx.project.clone(),
                        })
                        .await,
                )?
                .vms;
            ctx.print(render::vms_json(&vs), || render::vms_table(&vs))
        }
        VmCommand::Console { vm, follow, raw } => console(ctx, &vm, follow, raw).await,
    }
}

async fn image(ctx: &Ctx, command: ImageCommand) -> Result<(), Failure> {
    match command {
        ImageCommand::Pull(a) => {
            let request = a.request().map_err(Failure::Usage)?;
            let mut client = ctx.connect().await?;
            let call = client.pull_image(request);
            let what = if a.pdisk {
                format!("pulling {} into the cache and pdisk", a.url)
            } else {
                format!("pulling {}", a.url)
            };
            let c = ctx.answer(ctx.waiting(what, call).await)?;
            ctx.print(render::cached_image_json(&c), || render::image_view(&c))
        }
        ImageCommand::List => {
            let list = ctx.answer(ctx.connect().await?.list_images(ListImagesRequest {}).await)?;
            ctx.print(render::images_json(&list.images, &list.unreachable), || {
                render::images_table(&list.images, &list.unreachable)
            })
        }
        ImageCommand::Rm(a) => evict(ctx, a).await,
    }
}

/// `image rm`: a prefix of a checksum is first resolved against the images
/// the agent lists, and must name exactly one.
async fn evict(ctx: &Ctx, a: RmArgs) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    let sha256 = match a.whole() {
        Some(sha256) => sha256.to_owned(),
        None => {
            let images = ctx
                .answer(client.list_images(ListImagesRequest {}).await)?
                .images;
            let mut matches = a.matching(images.iter().map(|i| i.sha256.as_str()));
            match matches.len() {
                // As the agent says it of a whole checksum it does not hold.
                0 => {
                    return Err(Failure::Server(tonic::Status::not_found(format!(
                        "no cached image's SHA-256 starts with {} (see agentctl image list)",
                        a.sha256
                    ))))
                }
                1 => matches.remove(0),
                n => {
                    return Err(Failure::Usage(format!(
                        "{} is the start of {n} images' SHA-256 ({}): give more digits",
                        a.sha256,
                        matches.join(", ")
                    )))
                }
            }
        }
    };
    let (local, pdisk) = a.caches();
    let request = EvictImageRequest {
        request_id: String::new(),
        sha256: sha256.clone(),
        local,
        pdisk,
        server: a.server.as_ref().map(|s| s.to_string()).unwrap_or_default(),
    };
    let evicted = ctx.answer(client.evict_image(request).await)?.evicted;
    ctx.print(render::evicted_json(&sha256, &evicted), || {
        render::evicted_text(&sha256, &evicted)
    })
}

/// SIGINT as a stream, so that Ctrl-C ends a `--follow` cleanly (exit 0,
/// output flushed) instead of killing the process mid-write.
fn interrupts() -> Result<Signal, Failure> {
    signal(SignalKind::interrupt())
        .map_err(|e| Failure::Local(format!("cannot watch for Ctrl-C: {e}")))
}

/// Writes one piece of a stream; `Ok(false)` when nobody reads stdout any
/// more (`agentctl events --follow | head`): time to stop, successfully.
fn emit(bytes: &[u8]) -> Result<bool, Failure> {
    match cli::try_write_stdout(bytes) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure::Local(format!("cannot write the output: {e}"))),
    }
}

/// A core error met on this side (the broker, a payload) as a failure.
fn local(e: stratus_core::error::Error) -> Failure {
    match e.kind() {
        stratus_core::error::ErrorKind::InvalidArgument => Failure::Usage(e.to_string()),
        _ => Failure::Local(e.to_string()),
    }
}

/// `events --from-nats`: the agents' events as the broker holds them,
/// through a durable consumer, printed as from the agent.
async fn events_from_nats(
    ctx: &Ctx,
    a: &EventsArgs,
    settings: stratus_core::nats::NatsSettings,
    durable: String,
) -> Result<(), Failure> {
    if a.since != 0 {
        return Err(Failure::Usage(
            "--since reads the agent's journal; a durable consumer resumes where it \
             left off"
                .into(),
        ));
    }
    let vm = a.vm.as_ref().map(|v| v.to_string());
    let mut interrupted = interrupts()?;
    let read = stratus_core::nats::read_durable(
        &settings,
        &durable,
        "stratus.agent.>",
        a.follow,
        Duration::from_secs(2),
        |m| {
            let event = agent::publisher::event_from_payload(&m.payload)?;
            if vm
                .as_ref()
                .is_some_and(|v| *v != event.vm_uuid && *v != event.vm_name)
            {
                return Ok(true);
            }
            let line = if ctx.json {
                format!("{}\n", render::event_json(&event))
            } else {
                render::event_line(&event)
            };
            emit(line.as_bytes()).map_err(|f| match f {
                Failure::Local(s) => stratus_core::error::Error::internal(s),
                other => stratus_core::error::Error::internal(format!("{other:?}")),
            })
        },
    );
    tokio::select! {
        _ = interrupted.recv() => Ok(()),
        r = read => r.map_err(local),
    }
}

async fn events(ctx: &Ctx, a: EventsArgs) -> Result<(), Failure> {
    if let Some((settings, durable)) = a.nats.settings().map_err(local)? {
        return events_from_nats(ctx, &a, settings, durable).await;
    }
    let request = WatchEventsRequest {
        project: ctx.project.clone(),
        since_seq: a.since,
        vm: a.vm.map(String::from).unwrap_or_default(),
        no_follow: !a.follow,
    };
    let mut interrupted = interrupts()?;
    let mut client = ctx.connect().await?;
    let mut stream = ctx.answer(client.watch_events(request).await)?;
    let mut last = a.since;
    loop {
        let message = tokio::select! {
            _ = interrupted.recv() => return Ok(()),
            m = stream.message() => m.map_err(|s| ctx.remote.failure(s))?,
        };
        let Some(event) = message else {
            if !a.follow {
                return Ok(());
            }
            // A live stream ends only when the agent goes away.
            return Err(Failure::Local(format!(
                "{SERVER} at {} ended the event stream; resume with --since {last}",
                ctx.remote.url()
            )));
        };
        last = event.seq;
        let line = if ctx.json {
            format!("{}\n", render::event_json(&event))
        } else {
            render::event_line(&event)
        };
        if !emit(line.as_bytes())? {
            return Ok(());
        }
    }
}

/// Prints a console log as it comes: the bytes (terminal control removed
/// unless --raw), or with --json
/// one JSON line `{"vm", "console_log", "text"}` per batch.
struct ConsoleOut {
    json: bool,
    vm: String,
    path: String,
    text: Utf8Chunks,
    /// None with --raw.
    filter: Option<TerminalFilter>,
}

impl ConsoleOut {
    /// Prints what was appended to the log since the last call. The first
    /// call must be able to read the file; later ones take a vanished file
    /// as no news (the VM is being destroyed, which the state poll notices).
    /// With --json, an empty batch prints only on the first call, so a
    /// script always gets an object. `Ok(false)`: stdout was closed.
    fn drain(&mut self, tail: &mut Tail, first: bool) -> Result<bool, Failure> {
        let mut text = String::new();
        loop {
            let piece = match tail.read() {
                Ok(piece) => piece,
                Err(e) if !first && e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(unreadable(&self.vm, tail.path(), &e)),
            };
            if piece.is_empty() {
                break;
            }
            let piece = match &mut self.filter {
                Some(f) => f.push(&piece),
                None => piece,
            };
            if self.json {
                text.push_str(&self.text.push(&piece));
            } else if !emit(&piece)? {
                return Ok(false);
            }
        }
        if self.json && (first || !text.is_empty()) {
            return self.emit_json(text);
        }
        Ok(true)
    }

    /// Ends the output: a character cut short at the very end, replaced.
    fn finish(&mut self) -> Result<(), Failure> {
        let rest = self.text.finish();
        if self.json && !rest.is_empty() {
            self.emit_json(rest)?;
        }
        Ok(())
    }

    fn emit_json(&self, text: String) -> Result<bool, Failure> {
        let line = json!({ "vm": self.vm, "console_log": self.path, "text": text });
        emit(format!("{line}\n").as_bytes())
    }
}

fn unreadable(vm: &str, path: &Path, e: &std::io::Error) -> Failure {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound => {
            "; agentctl reads the file itself, so run it on the agent's host"
        }
        std::io::ErrorKind::PermissionDenied => "; run agentctl as a user who may read it",
        _ => "",
    };
    Failure::Local(format!(
        "cannot read the console log of vm {vm} at {}: {e}{hint}",
        path.display()
    ))
}

async fn console(ctx: &Ctx, vm: &Ref, follow: bool, raw: bool) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    let v = ctx.answer(client.get_vm(ctx.request(vm)).await)?;
    if v.console_log.is_empty() {
        return Err(Failure::Local(format!("vm {} has no console log", v.name)));
    }
    let mut tail = Tail::new(&v.console_log);
    let mut out = ConsoleOut {
        json: ctx.json,
        vm: v.name.clone(),
        path: v.console_log.clone(),
        text: Utf8Chunks::default(),
        filter: (!raw).then(TerminalFilter::default),
    };
    if !out.drain(&mut tail, true)? {
        return Ok(());
    }
    if !follow || !render::is_active(v.state) {
        return out.finish();
    }
    let mut interrupted = interrupts()?;
    let mut reads = tokio::time::interval(CONSOLE_POLL);
    let mut checks = tokio::time::interval(STATE_POLL);
    checks.reset();
    loop {
        tokio::select! {
            _ = interrupted.recv() => break,
            _ = reads.tick() => {
                if !out.drain(&mut tail, false)? {
                    return Ok(());
                }
            }
            _ = checks.tick() => {
                let running = match client.get_vm(ctx.request(vm)).await {
                    Ok(r) => render::is_active(r.into_inner().state),
                    // Destroyed meanwhile: the log is complete.
                    Err(s) if s.code() == tonic::Code::NotFound => false,
                    Err(s) => return Err(ctx.remote.failure(s)),
                };
                if !running {
                    // QEMU's last words land before the state changes.
                    if !out.drain(&mut tail, false)? {
                        return Ok(());
                    }
                    break;
                }
            }
        }
    }
    out.finish()
}

/// `vm migrate`: MigrateVm, with QEMU's progress (MIGRATION_PROGRESS
/// events) on the spinner meanwhile.
async fn migrate(ctx: &Ctx, vm: Ref, to: String) -> Result<(), Failure> {
    let mut client = ctx.connect().await?;
    let since = ctx
        .answer(client.get_host(GetHostRequest {}).await)?
        .last_event_seq;
    let mut events = ctx.answer(
        client
            .watch_events(WatchEventsRequest {
                project: ctx.project.clone(),
                since_seq: since,
                vm: vm.to_string(),
                no_follow: false,
            })
            .await,
    )?;
    let spinner = ctx.spinners.then(|| {
        let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        s.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        s.set_message(format!("migrating {vm} to {to}"));
        s.enable_steady_tick(Duration::from_millis(120));
        s
    });
    let call = client.migrate_vm(MigrateVmRequest {
        vm: vm.to_string(),
        destination: to.clone(),
        project: ctx.project.clone(),
        request_id: String::new(),
    });
    tokio::pin!(call);
    let answer = loop {
        tokio::select! {
            a = &mut call => break a,
            e = events.message() => match e {
                Ok(Some(e)) if e.r#type == EventType::MigrationProgress as i32 => {
                    if let Some(s) = &spinner {
                        s.set_message(format!(
                            "migrating {vm} to {to}: {} of {} MiB sent ({})",
                            e.bytes >> 20,
                            e.total_bytes >> 20,
                            e.detail
                        ));
                    }
                }
                Ok(Some(_)) => {}
                // The stream ended: the answer still comes.
                _ => break call.await,
            },
        }
    };
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let m = ctx.answer(answer)?;
    ctx.print(
        json!({
            "vm": m.vm_uuid,
            "destination": m.destination,
            "total_ms": m.total_ms,
            "downtime_ms": m.downtime_ms,
            "transferred_bytes": m.transferred_bytes,
            "qemu_total_ms": m.qemu_total_ms,
            "tls": m.tls,
        }),
        || {
            format!(
                "Migrated {vm} to {}: {} ms in all, {} ms of downtime, {} MiB sent {}.\n",
                m.destination,
                m.total_ms,
                m.downtime_ms,
                m.transferred_bytes >> 20,
                if m.tls { "over TLS" } else { "over plain TCP" }
            )
        },
    )
}
