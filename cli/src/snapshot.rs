//! `vblock snapshot create|list|delete` (ebs.createsnapshot, ebs.describesnapshots,
//! ebs.deletesnapshot).

use std::time::{Duration, Instant};

use clap::Subcommand;
use vblock::control::api::{
    CreateSnapshotRequest, DescribeSnapshotsReply, DescribeSnapshotsRequest, Filter, ReturnReply,
    Snapshot, SnapshotIdRequest,
};

use crate::client::{print, print_snapshots, Client, ClientError, Output};

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

fn percent(s: &Snapshot) -> u64 {
    s.progress.trim_end_matches('%').parse().unwrap_or(0)
}

/// Runs one snapshot subcommand and prints its reply as `out` says.
pub async fn run(c: &Client, cmd: SnapshotCommand, out: Output) -> Result<(), ClientError> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            description,
            no_wait,
            wait_timeout,
        } => {
            let req = CreateSnapshotRequest {
                volume_id: volume,
                description,
            };
            let mut snap: Snapshot = c.call("ebs.createsnapshot", &req).await?;
            if !no_wait {
                snap = wait_completed(c, snap, wait_timeout).await?;
            }
            print(out, &snap, |s| println!("{}", s.snapshot_id));
        }
        SnapshotCommand::List { volume } => {
            let req = DescribeSnapshotsRequest {
                snapshot_ids: None,
                filters: volume.map(|v| {
                    vec![Filter {
                        name: "volume-id".into(),
                        values: vec![v],
                    }]
                }),
            };
            let v: DescribeSnapshotsReply = c.call("ebs.describesnapshots", &req).await?;
            print(out, &v, |v| print_snapshots(&v.snapshots));
        }
        SnapshotCommand::Delete { id } => {
            let v: ReturnReply = c
                .call("ebs.deletesnapshot", &SnapshotIdRequest { snapshot_id: id })
                .await?;
            print(out, &v, |_| println!("deleted"));
        }
    }
    Ok(())
}

/// Polls the snapshot until `completed`, drawing its `Progress`; `error` or the timeout fail.
async fn wait_completed(
    c: &Client,
    mut snap: Snapshot,
    timeout: Duration,
) -> Result<Snapshot, ClientError> {
    let id = snap.snapshot_id.clone();
    let bar = crate::progress::bar(100, "{msg} [{bar:40}] {pos}%");
    bar.set_message(format!("snapshot {id}"));
    let started = Instant::now();
    loop {
        bar.set_position(percent(&snap));
        match snap.state.as_str() {
            "completed" => {
                bar.finish_and_clear();
                return Ok(snap);
            }
            "error" => {
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
        let req = DescribeSnapshotsRequest {
            snapshot_ids: Some(vec![id.clone()]),
            filters: None,
        };
        let v: DescribeSnapshotsReply = c.call("ebs.describesnapshots", &req).await?;
        snap = v
            .snapshots
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Api {
                code: "InvalidSnapshot.NotFound".into(),
                message: format!("snapshot {id} vanished while it was being stored"),
            })?;
    }
}
