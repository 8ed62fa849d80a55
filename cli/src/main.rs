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
use serde_json::{json, Value};

use client::{ebs_request, print_volumes, size_to_gib, Client, ClientError};

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
    /// files). Fewer threads mean fewer wake-ups per request: 4k random reads at QD32 ran
    /// ~20% faster with 8 than with tokio's default of 512 (docs/BENCHMARKS.md). Every blocking
    /// task is a leaf (none waits for another), so a small pool cannot deadlock.
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
    /// threads (the read queue, the WAL writer, the background pool): on 2 cores one async
    /// thread ran 4k random reads at QD32 ~15-20% faster than tokio's default of one per core
    /// (docs/BENCHMARKS.md, "One async thread on two cores").
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
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
    /// Mount a volume for a VM and print its NBD URI (ebs.mount).
    Mount {
        #[command(flatten)]
        remote: Remote,
        /// Volume id.
        id: String,
    },
    /// Unmount a volume (ebs.unmount).
    Unmount {
        #[command(flatten)]
        remote: Remote,
        /// Volume id.
        id: String,
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

fn print(output: Output, v: &Value, table: impl FnOnce(&Value)) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => table(v),
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
            } => {
                let mut body = json!({"VolumeType": r#type});
                if let Some(size) = size {
                    body["Size"] = json!(size_to_gib(&size)?);
                }
                if let Some(snap) = snapshot {
                    body["SnapshotId"] = json!(snap);
                }
                if let Some(n) = name {
                    body["TagSpecifications"] =
                        json!([{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": n}]}]);
                }
                let v = c.request("ebs.createvolume", body).await?;
                print(out, &v, |v| {
                    println!("{}", v["VolumeId"].as_str().unwrap_or(""))
                });
            }
            VolumeCommand::List => {
                let v = c.request("ebs.describevolumes", json!({})).await?;
                print(out, &v, |v| {
                    print_volumes(v["Volumes"].as_array().map(Vec::as_slice).unwrap_or(&[]))
                });
            }
            VolumeCommand::Describe { id } => {
                let v = c
                    .request("ebs.describevolumes", json!({"VolumeIds": [id]}))
                    .await?;
                let mut vol = v["Volumes"].get(0).cloned().unwrap_or(Value::Null);
                let space = c
                    .request("ebs.describevolumespace", json!({"VolumeIds": [id]}))
                    .await?;
                vol["Space"] = space["VolumeSpaces"].get(0).cloned().unwrap_or(Value::Null);
                print(out, &vol, |v| {
                    print_volumes(std::slice::from_ref(v));
                    snapshot::print_space(&v["Space"]);
                });
            }
            VolumeCommand::Delete { id } => {
                let v = c
                    .request("ebs.deletevolume", json!({"VolumeId": id}))
                    .await?;
                print(out, &v, |_| println!("deleted {id}"));
            }
            VolumeCommand::Attach {
                id,
                instance,
                device,
            } => {
                let v = c
                    .request(
                        "ebs.attachvolume",
                        json!({"VolumeId": id, "InstanceId": instance, "Device": device}),
                    )
                    .await?;
                print(out, &v, |v| {
                    println!(
                        "{} {} {} {}",
                        v["VolumeId"].as_str().unwrap_or(""),
                        v["InstanceId"].as_str().unwrap_or(""),
                        v["Device"].as_str().unwrap_or(""),
                        v["State"].as_str().unwrap_or("")
                    )
                });
            }
            VolumeCommand::Detach {
                id,
                instance,
                force,
            } => {
                let mut body = json!({"VolumeId": id, "Force": force});
                if let Some(i) = instance {
                    body["InstanceId"] = json!(i);
                }
                let v = c.request("ebs.detachvolume", body).await?;
                print(out, &v, |v| {
                    println!(
                        "{} {}",
                        v["VolumeId"].as_str().unwrap_or(""),
                        v["State"].as_str().unwrap_or("")
                    )
                });
            }
            VolumeCommand::Resize { id, size } => {
                let v = c
                    .request(
                        "ebs.modifyvolume",
                        json!({"VolumeId": id, "Size": size_to_gib(&size)?}),
                    )
                    .await?;
                print(out, &v, |v| {
                    let m = &v["VolumeModification"];
                    println!(
                        "{} {}GiB -> {}GiB {}",
                        m["VolumeId"].as_str().unwrap_or(""),
                        m["OriginalSize"],
                        m["TargetSize"],
                        m["ModificationState"].as_str().unwrap_or("")
                    );
                });
            }
        }
        Ok(())
    })
    .await
}

async fn mount_command(r: &Remote, id: &str, mount: bool) -> Result<(), ClientError> {
    let out = r.output;
    remote(r, async |c: &Client| {
        let subject = if mount { "ebs.mount" } else { "ebs.unmount" };
        let v = c.request(subject, ebs_request(id)).await?;
        let err = v["Error"].as_str().unwrap_or("");
        if !err.is_empty() {
            return Err(ClientError::Api {
                code: if v["NotFound"].as_bool() == Some(true) {
                    "InvalidVolume.NotFound".into()
                } else {
                    "MountFailed".into()
                },
                message: err.to_owned(),
            });
        }
        print(out, &v, |v| {
            if mount {
                println!("{}", v["URI"].as_str().unwrap_or(""))
            } else {
                println!("unmounted {id}")
            }
        });
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
                remote(&r, async |c: &Client| {
                    let (v, table) = snapshot::run(c, command).await?;
                    print(out, &v, table);
                    Ok(())
                })
                .await
                .map_err(|e| (e.to_string(), e.exit_code()))
            }
            Command::Mount { remote, id } => mount_command(&remote, &id, true)
                .await
                .map_err(|e| (e.to_string(), e.exit_code())),
            Command::Unmount { remote, id } => mount_command(&remote, &id, false)
                .await
                .map_err(|e| (e.to_string(), e.exit_code())),
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
