//! `vblock`: the daemon (`vblock serve`) and its management commands.

mod client;
mod config;
mod limits;
mod malloc;
mod memory;
mod metrics;
mod offline;
mod progress;
mod serve;
mod size;
mod snapshot;
mod status;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use client::{
    ebs_request, print, print_space, print_volumes, size_to_gib, Client, ClientError, Output,
};
use vblock::control::api::{
    self, AttachVolumeRequest, CreateVolumeRequest, DescribeVolumeSpaceReply,
    DescribeVolumeSpaceRequest, DescribeVolumesReply, DescribeVolumesRequest, DetachVolumeRequest,
    EbsMountResponse, EbsUnmountResponse, ModifyVolumeReply, ModifyVolumeRequest, ReturnReply, Tag,
    TagSpecification, VolumeAttachment, VolumeIdRequest, VolumeSpace,
};

/// `vblock --version`: the crate version and the git commit it was built from (cli/build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("VBLOCK_GIT_COMMIT"),
    ")"
);

/// vblock: virtual block volumes over NBD, managed over NATS.
#[derive(Debug, Parser)]
#[command(name = "vblock", version = VERSION, about)]
struct Cli {
    /// TOML file with the same keys as the flags of `vblock serve` (flags > env > file >
    /// defaults).
    #[arg(long, global = true, env = "VBLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "VBLOCK_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
    /// Most threads for blocking work (chunk reads and decoding, RocksDB, fsync of chunk
    /// files). Fewer threads mean fewer wake-ups per request than with tokio's default of 512
    /// (docs/design/read-queue.md). Every blocking task is a leaf (none waits for another), so a
    /// small pool cannot deadlock.
    #[arg(
        long,
        global = true,
        env = "VBLOCK_BLOCKING_THREADS",
        default_value_t = 16,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    blocking_threads: u16,
    /// Threads of the async runtime (NBD connections, NATS, the flusher's scheduling); 0 (the
    /// default) is one less than the cores, at least 1. The CPU-heavy work runs on other
    /// threads (the read queue, the WAL writer, the background pool), so on 2 cores one async
    /// thread serves random reads faster than tokio's default of one per core
    /// (docs/design/one-async-thread.md).
    #[arg(long, global = true, env = "VBLOCK_ASYNC_THREADS", default_value_t = 0)]
    async_threads: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// Flags shared by the commands that talk to a daemon.
#[derive(Debug, clap::Args)]
struct Remote {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "VBLOCK_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// Seconds to wait for NATS and the daemon.
    #[arg(long, global = true, default_value = "10")]
    timeout: u64,
}

// Parsed once at start; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: NBD server and ebs.* control plane.
    Serve(serve::ServeArgs),
    /// Manage volumes (over NATS).
    Volume {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Manage snapshots (over NATS). A snapshot is also a read-only NBD export named by its id.
    Snapshot {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Mount a volume (read-write) or a snapshot (read-only) and print its NBD URI
    /// (ebs.mount); it is an NBD export until unmounted. Mounting again prints the same URI.
    Mount {
        #[command(flatten)]
        remote: Remote,
        /// Volume id or snapshot id.
        id: String,
        /// Mount through this node (`ebs.NODE.mount`); refused if mounted through another.
        #[arg(long)]
        node: Option<String>,
    },
    /// Unmount a volume or snapshot (ebs.unmount): its export ends and its NBD clients are
    /// disconnected.
    Unmount {
        #[command(flatten)]
        remote: Remote,
        /// Volume id or snapshot id.
        id: String,
        /// Unmount through this node (`ebs.NODE.unmount`); refused if mounted through another.
        #[arg(long)]
        node: Option<String>,
    },
    /// Decode and verify on-disk formats of a stopped daemon's data directory.
    Inspect {
        #[command(subcommand)]
        what: offline::InspectCommand,
    },
    /// Check a stopped daemon's data directory: WAL CRCs, chunk CRCs, map references.
    Fsck(offline::FsckArgs),
    /// Copy a raw image file into a volume of a stopped daemon's data directory.
    Import(offline::ImportArgs),
    /// Copy a volume of a stopped daemon's data directory into a raw image file.
    Export(offline::ExportArgs),
    /// Rebuild a data directory's volumes from the backend's chunk objects (disaster recovery;
    /// `serve` does this by itself on an empty data directory).
    Recover(offline::RecoverArgs),
    /// Live table of a daemon's volumes: mounts, connections, IOPS, WAL pending, upload lag
    /// (read from its Prometheus endpoint).
    Status {
        /// The daemon's metrics URL (`vblock serve --metrics-listen`).
        #[arg(
            long,
            env = "VBLOCK_METRICS_URL",
            default_value = "http://127.0.0.1:9109/metrics"
        )]
        metrics_url: String,
        /// Time between the two scrapes a rate is computed from, e.g. 1s, 500ms.
        #[arg(long, default_value = "1s", value_parser = humantime_duration)]
        interval: Duration,
        /// Keep refreshing until interrupted.
        #[arg(long)]
        watch: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print a shell completion script, e.g. `vblock completions bash > /etc/bash_completion.d/vblock`.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

pub(crate) fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (ebs.createvolume).
    Create {
        /// Size in whole GiB, e.g. 10GiB (default with --snapshot: the snapshot's size).
        #[arg(long, required_unless_present = "snapshot")]
        size: Option<String>,
        /// Create the volume as a clone of this snapshot (shares its chunks; copy-on-write).
        #[arg(long)]
        snapshot: Option<String>,
        /// Name (stored as the Name tag).
        #[arg(long)]
        name: Option<String>,
        /// Volume type.
        #[arg(long, default_value = "gp3")]
        r#type: String,
        /// EBS Multi-Attach: attachable to several instances at once (io1 and io2 only).
        #[arg(long)]
        multi_attach: bool,
    },
    /// List volumes (ebs.describevolumes).
    List,
    /// Describe one volume, with its space: allocated, stored and dead bytes, compression.
    Describe {
        /// Volume id.
        id: String,
    },
    /// Delete a volume (ebs.deletevolume).
    Delete {
        /// Volume id.
        id: String,
    },
    /// Attach a volume to an instance (ebs.attachvolume).
    Attach {
        /// Volume id.
        id: String,
        /// Instance id.
        #[arg(long)]
        instance: String,
        /// Device name, e.g. /dev/sdf.
        #[arg(long)]
        device: String,
    },
    /// Detach a volume (ebs.detachvolume).
    Detach {
        /// Volume id.
        id: String,
        /// Only if attached to this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Detach even if in use.
        #[arg(long)]
        force: bool,
    },
    /// Grow a volume (ebs.modifyvolume).
    Resize {
        /// Volume id.
        id: String,
        /// New size in whole GiB.
        #[arg(long)]
        size: String,
    },
}

fn init_logging(format: LogFormat) {
    // async_nats logs every connection event at info; vblock logs the ones that matter itself.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn remote(
    remote: &Remote,
    f: impl AsyncFnOnce(&Client) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let client = Client::connect(&remote.nats_url, Duration::from_secs(remote.timeout)).await?;
    f(&client).await
}

async fn volume_command(r: &Remote, cmd: VolumeCommand) -> Result<(), ClientError> {
    let out = r.output;
    remote(r, async |c: &Client| {
        match cmd {
            VolumeCommand::Create {
                size,
                snapshot,
                name,
                r#type,
                multi_attach,
            } => {
                let req = CreateVolumeRequest {
                    size: size
                        .map(|s| size_to_gib(&s).map(|g| g as i64))
                        .transpose()?,
                    volume_type: Some(r#type),
                    availability_zone: None,
                    snapshot_id: snapshot,
                    iops: None,
                    tag_specifications: name.map(|n| {
                        vec![TagSpecification {
                            resource_type: "volume".into(),
                            tags: vec![Tag {
                                key: "Name".into(),
                                value: n,
                            }],
                        }]
                    }),
                    client_token: None,
                    multi_attach_enabled: multi_attach.then_some(true),
                };
                let v: api::Volume = c.call("ebs.createvolume", &req).await?;
                print(out, &v, |v| println!("{}", v.volume_id));
            }
            VolumeCommand::List => {
                let v: DescribeVolumesReply = c
                    .call("ebs.describevolumes", &DescribeVolumesRequest::default())
                    .await?;
                print(out, &v, |v| print_volumes(&v.volumes));
            }
            VolumeCommand::Describe { id } => {
                let ids = Some(vec![id.clone()]);
                let v: DescribeVolumesReply = c
                    .call(
                        "ebs.describevolumes",
                        &DescribeVolumesRequest {
                            volume_ids: ids.clone(),
                            filters: None,
                        },
                    )
                    .await?;
                let space: DescribeVolumeSpaceReply = c
                    .call(
                        "ebs.describevolumespace",
                        &DescribeVolumeSpaceRequest { volume_ids: ids },
                    )
                    .await?;
                let (Some(vol), Some(space)) = (v.volumes.first(), space.volume_spaces.first())
                else {
                    return Err(ClientError::Api {
                        code: "InternalError".into(),
                        message: format!("the daemon described no volume {id}"),
                    });
                };
                let described = DescribedVolume {
                    volume: vol.clone(),
                    space: space.clone(),
                };
                print(out, &described, |d| {
                    print_volumes(std::slice::from_ref(&d.volume));
                    print_space(&d.space);
                });
            }
            VolumeCommand::Delete { id } => {
                let v: ReturnReply = c
                    .call(
                        "ebs.deletevolume",
                        &VolumeIdRequest {
                            volume_id: id.clone(),
                        },
                    )
                    .await?;
                print(out, &v, |_| println!("deleted {id}"));
            }
            VolumeCommand::Attach {
                id,
                instance,
                device,
            } => {
                let req = AttachVolumeRequest {
                    volume_id: id,
                    instance_id: instance,
                    device,
                };
                let v: VolumeAttachment = c.call("ebs.attachvolume", &req).await?;
                print(out, &v, |v| {
                    println!("{} {} {} {}", v.volume_id, v.instance_id, v.device, v.state)
                });
            }
            VolumeCommand::Detach {
                id,
                instance,
                force,
            } => {
                let req = DetachVolumeRequest {
                    volume_id: id,
                    instance_id: instance,
                    device: None,
                    force,
                };
                let v: VolumeAttachment = c.call("ebs.detachvolume", &req).await?;
                print(out, &v, |v| println!("{} {}", v.volume_id, v.state));
            }
            VolumeCommand::Resize { id, size } => {
                let req = ModifyVolumeRequest {
                    volume_id: id,
                    size: size_to_gib(&size)? as i64,
                };
                let v: ModifyVolumeReply = c.call("ebs.modifyvolume", &req).await?;
                print(out, &v, |v| {
                    let m = &v.volume_modification;
                    println!(
                        "{} {}GiB -> {}GiB {}",
                        m.volume_id, m.original_size, m.target_size, m.modification_state
                    );
                });
            }
        }
        Ok(())
    })
    .await
}

/// `vblock volume describe --output json`: the EC2 `Volume` with its space rows under `Space`.
#[derive(serde::Serialize)]
struct DescribedVolume {
    #[serde(flatten)]
    volume: api::Volume,
    #[serde(rename = "Space")]
    space: VolumeSpace,
}

async fn mount_command(
    r: &Remote,
    id: &str,
    node: Option<&str>,
    mount: bool,
) -> Result<(), ClientError> {
    let out = r.output;
    let subject = |op: &str| match node {
        Some(n) => format!("ebs.{n}.{op}"),
        None => format!("ebs.{op}"),
    };
    remote(r, async |c: &Client| {
        let failed = |error: &str, not_found: bool| ClientError::Api {
            code: if not_found {
                "InvalidVolume.NotFound".into()
            } else {
                "MountFailed".into()
            },
            message: error.to_owned(),
        };
        if mount {
            let v: EbsMountResponse = c.call(&subject("mount"), &ebs_request(id)).await?;
            if !v.error.is_empty() {
                return Err(failed(&v.error, false));
            }
            print(out, &v, |v| println!("{}", v.uri));
        } else {
            let v: EbsUnmountResponse = c.call(&subject("unmount"), &ebs_request(id)).await?;
            if !v.error.is_empty() {
                return Err(failed(&v.error, v.not_found));
            }
            print(out, &v, |_| println!("unmounted {id}"));
        }
        Ok(())
    })
    .await
}

/// Parses the command line with `--config` applied. Exits (like clap) on bad flags, `--help`
/// and `--version`; a bad config file is exit code 2.
fn parse() -> Result<(Cli, Option<String>), (String, i32)> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    let mut from_file = Default::default();
    if let Some(path) = config::config_path(&args) {
        (cmd, from_file) = config::apply(cmd, &path).map_err(|e| (e.to_string(), 2))?;
    }
    let matches = cmd
        .try_get_matches_from_mut(&args)
        .unwrap_or_else(|e| e.exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `serve --print-config`: the effective settings and where each came from.
    let printed = match (&cli.command, matches.subcommand_matches("serve")) {
        (Command::Serve(a), Some(m)) if a.print_config => cmd
            .find_subcommand("serve")
            .map(|serve| config::effective(serve, m, &from_file)),
        _ => None,
    };
    Ok((cli, printed))
}

/// Async runtime threads for `--async-threads n`: `n`, or for 0 one less than the cores (at
/// least 1).
fn async_threads(n: u16) -> usize {
    if n > 0 {
        return usize::from(n);
    }
    std::thread::available_parallelism().map_or(1, |c| c.get().saturating_sub(1).max(1))
}

fn main() -> ExitCode {
    malloc::tune();
    let (cli, printed) = match parse() {
        Ok(v) => v,
        Err((msg, code)) => {
            eprintln!("vblock: {msg}");
            return ExitCode::from(code as u8);
        }
    };
    if let Some(text) = printed {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "vblock", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    progress::set_quiet(cli.quiet);
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_threads(cli.async_threads))
        .max_blocking_threads(usize::from(cli.blocking_threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vblock: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args)
                .await
                .map_err(|e| (e.to_string(), e.exit_code())),
            Command::Volume { remote, command } => volume_command(&remote, command)
                .await
                .map_err(|e| (e.to_string(), e.exit_code())),
            Command::Snapshot { remote: r, command } => {
                let out = r.output;
                remote(&r, async |c: &Client| snapshot::run(c, command, out).await)
                    .await
                    .map_err(|e| (e.to_string(), e.exit_code()))
            }
            Command::Mount { remote, id, node } => {
                mount_command(&remote, &id, node.as_deref(), true)
                    .await
                    .map_err(|e| (e.to_string(), e.exit_code()))
            }
            Command::Unmount { remote, id, node } => {
                mount_command(&remote, &id, node.as_deref(), false)
                    .await
                    .map_err(|e| (e.to_string(), e.exit_code()))
            }
            Command::Inspect { what } => {
                offline::inspect(what).await.map_err(|e| (e.to_string(), 1))
            }
            Command::Fsck(a) => offline::fsck(a).await.map_err(|e| (e.to_string(), 1)),
            Command::Import(a) => offline::import(a).await.map_err(|e| (e.to_string(), 1)),
            Command::Export(a) => offline::export(a).await.map_err(|e| (e.to_string(), 1)),
            Command::Recover(a) => offline::recover(a).await.map_err(|e| (e.to_string(), 1)),
            Command::Status {
                metrics_url,
                interval,
                watch,
                output,
            } => status::run(&metrics_url, interval, watch, output == Output::Json)
                .await
                .map_err(|e| (e.to_string(), 1)),
            Command::Completions { .. } => Ok(()),
        }
    });
    match code {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("vblock: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::async_threads;

    #[test]
    fn async_threads_leave_a_core_to_the_other_threads() {
        assert_eq!(async_threads(3), 3);
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        assert_eq!(async_threads(0), (cores - 1).max(1));
    }
}
