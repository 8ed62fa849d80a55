//! `vblock snapshot create|list|delete` (ebs.createsnapshot, ebs.describesnapshots,
//! ebs.deletesnapshot) and the space rows of `vblock volume describe`.

use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::size::format_size;

/// Snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume (ebs.createsnapshot) and wait until it is stored in the backend, with a
    /// progress bar.
    Create {
        /// Volume id.
        volume: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Return at once (state `pending`) instead of waiting for `completed`.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for `completed`, e.g. 10m.
        #[arg(long, default_value = "1h", value_parser = crate::humantime_duration)]
        wait_timeout: Duration,
    },
    /// List snapshots (ebs.describesnapshots).
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a snapshot (ebs.deletesnapshot); chunks only it used are freed.
    Delete {
        /// Snapshot id.
        id: String,
    },
}

/// Prints snapshots as a table.
pub fn print_snapshots(snaps: &[Value]) {
    println!(
        "{:<23} {:<22} {:>8} {:<10} {:>8} {:<25} DESCRIPTION",
        "SNAPSHOT ID", "VOLUME ID", "SIZE", "STATE", "PROGRESS", "STARTED"
    );
    for s in snaps {
        println!(
            "{:<23} {:<22} {:>8} {:<10} {:>8} {:<25} {}",
            s["SnapshotId"].as_str().unwrap_or(""),
            s["VolumeId"].as_str().unwrap_or(""),
            format_size(s["VolumeSize"].as_u64().unwrap_or(0) << 30),
            s["State"].as_str().unwrap_or(""),
            s["Progress"].as_str().unwrap_or(""),
            s["StartTime"].as_str().unwrap_or(""),
            s["Description"].as_str().unwrap_or(""),
        );
    }
}

/// Prints the space rows of one volume (`ebs.describevolumespace` entry).
pub fn print_space(s: &Value) {
    let bytes = |k: &str| format_size(s[k].as_u64().unwrap_or(0));
    println!("allocated {}", bytes("AllocatedBytes"));
    println!("stored    {}", bytes("StoredBytes"));
    println!("dead      {}", bytes("DeadBytes"));
    println!(
        "compression {:.2}x",
        s["CompressionRatio"].as_f64().unwrap_or(1.0)
    );
}

fn percent(s: &Value) -> u64 {
    s["Progress"]
        .as_str()
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap_or(0)
}

/// Runs one snapshot subcommand; returns the JSON to print and how to print it as a table.
pub async fn run(c: &Client, cmd: SnapshotCommand) -> Result<(Value, fn(&Value)), ClientError> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            description,
            no_wait,
            wait_timeout,
        } => {
            let mut snap = c
                .request(
                    "ebs.createsnapshot",
                    json!({"VolumeId": volume, "Description": description}),
                )
                .await?;
            if !no_wait {
                snap = wait_completed(c, snap, wait_timeout).await?;
            }
            Ok((snap, |v| {
                println!("{}", v["SnapshotId"].as_str().unwrap_or(""))
            }))
        }
        SnapshotCommand::List { volume } => {
            let body = match volume {
                Some(v) => json!({"Filters": [{"Name": "volume-id", "Values": [v]}]}),
                None => json!({}),
            };
            let v = c.request("ebs.describesnapshots", body).await?;
            Ok((v, |v| {
                print_snapshots(v["Snapshots"].as_array().map(Vec::as_slice).unwrap_or(&[]))
            }))
        }
        SnapshotCommand::Delete { id } => {
            let v = c
                .request("ebs.deletesnapshot", json!({"SnapshotId": id}))
                .await?;
            Ok((v, |_| println!("deleted")))
        }
    }
}

/// Polls the snapshot until `completed`, drawing its `Progress`; `error` or the timeout fail.
async fn wait_completed(
    c: &Client,
    mut snap: Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let id = snap["SnapshotId"].as_str().unwrap_or("").to_owned();
    let bar = crate::progress::bar(100, "{msg} [{bar:40}] {pos}%");
    bar.set_message(format!("snapshot {id}"));
    let started = Instant::now();
    loop {
        bar.set_position(percent(&snap));
        match snap["State"].as_str() {
            Some("completed") => {
                bar.finish_and_clear();
                return Ok(snap);
            }
            Some("error") => {
                bar.abandon();
                return Err(ClientError::Api {
                    code: "SnapshotFailed".into(),
                    message: format!("snapshot {id} could not be stored in the backend"),
                });
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            bar.abandon();
            return Err(ClientError::Api {
                code: "Timeout".into(),
                message: format!("snapshot {id} still pending after {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v = c
            .request("ebs.describesnapshots", json!({"SnapshotIds": [id]}))
            .await?;
        snap = v["Snapshots"].get(0).cloned().unwrap_or(Value::Null);
    }
}
