//! Management commands: requests to a running daemon over NATS, using the `ebs.*` contract.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use vblock::control::api::{EbsRequest, Snapshot, Volume, VolumeSpace};

use crate::size::{format_size, parse_size};

/// Why a management command failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS could not be reached (exit 3).
    #[error("cannot reach NATS at {url}: {reason}")]
    Nats {
        /// URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// No daemon answered (exit 3).
    #[error("no vblock daemon answered on {subject} within {secs} s (is `vblock serve` running and connected to the same NATS?)")]
    NoDaemon {
        /// Subject.
        subject: String,
        /// Timeout.
        secs: u64,
    },
    /// The daemon answered with an error (exit 1).
    #[error("{code}: {message}")]
    Api {
        /// EC2 error code.
        code: String,
        /// Message.
        message: String,
    },
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    /// Process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Api { .. } => 1,
            Self::Usage(_) => 2,
            Self::Nats { .. } | Self::NoDaemon { .. } => 3,
        }
    }
}

/// A connection to the daemon's control plane.
pub struct Client {
    nats: async_nats::Client,
    url: String,
    timeout: Duration,
}

impl Client {
    /// Connects to NATS at `url`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let nats = async_nats::ConnectOptions::new()
            .name("vblock-cli")
            .connection_timeout(timeout)
            .connect(url)
            .await
            .map_err(|e| ClientError::Nats {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            nats,
            url: url.to_owned(),
            timeout,
        })
    }

    /// Sends `req` (a request shape of `vblock::control::api`) to `subject` and decodes the
    /// reply as `R`. Errors: an EC2 `Error` reply as [`ClientError::Api`]; transport errors.
    pub async fn call<R: DeserializeOwned>(
        &self,
        subject: &str,
        req: &impl Serialize,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Usage(e.to_string()))?;
        let v = self.request(subject, body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Api {
            code: "InternalError".into(),
            message: format!("unexpected reply to {subject}: {e}"),
        })
    }

    /// Sends `body` on `subject` and returns the reply; an `{"Error": ...}` reply is an error.
    async fn request(&self, subject: &str, body: Value) -> Result<Value, ClientError> {
        let payload = serde_json::to_vec(&body).map_err(|e| ClientError::Usage(e.to_string()))?;
        let no_daemon = || ClientError::NoDaemon {
            subject: subject.to_owned(),
            secs: self.timeout.as_secs(),
        };
        let msg = match tokio::time::timeout(
            self.timeout,
            self.nats.request(subject.to_owned(), payload.into()),
        )
        .await
        {
            Err(_) => return Err(no_daemon()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(no_daemon())
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                return Err(no_daemon())
            }
            Ok(Err(e)) => {
                return Err(ClientError::Nats {
                    url: self.url.clone(),
                    reason: e.to_string(),
                })
            }
            Ok(Ok(m)) => m,
        };
        let v: Value = serde_json::from_slice(&msg.payload).map_err(|e| ClientError::Api {
            code: "InternalError".into(),
            message: format!("unparsable reply: {e}"),
        })?;
        if let Some(err) = v.get("Error").filter(|e| e.is_object()) {
            return Err(ClientError::Api {
                code: err["Code"].as_str().unwrap_or("Unknown").to_owned(),
                message: err["Message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(v)
    }
}

/// Converts a human size to whole GiB (EC2 `Size`).
pub fn size_to_gib(s: &str) -> Result<u64, ClientError> {
    let bytes = parse_size(s).map_err(ClientError::Usage)?;
    if bytes == 0 || bytes % (1 << 30) != 0 {
        return Err(ClientError::Usage(format!(
            "size {s} must be a whole number of GiB (EC2 Size), e.g. 10GiB"
        )));
    }
    Ok(bytes >> 30)
}

/// Prints volumes as a table.
pub fn print_volumes(volumes: &[Volume]) {
    println!(
        "{:<22} {:>8} {:<10} {:<10} {:<20} {:<25}",
        "VOLUME ID", "SIZE", "STATE", "TYPE", "ATTACHED TO", "CREATED"
    );
    for v in volumes {
        let attached: Vec<&str> = v
            .attachments
            .iter()
            .map(|a| a.instance_id.as_str())
            .collect();
        println!(
            "{:<22} {:>8} {:<10} {:<10} {:<20} {:<25}",
            v.volume_id,
            format_size(v.size << 30),
            v.state,
            v.volume_type,
            if attached.is_empty() {
                "-".to_owned()
            } else {
                attached.join(",")
            },
            v.create_time,
        );
    }
}

/// Prints snapshots as a table.
pub fn print_snapshots(snaps: &[Snapshot]) {
    println!(
        "{:<23} {:<22} {:>8} {:<10} {:>8} {:<25} DESCRIPTION",
        "SNAPSHOT ID", "VOLUME ID", "SIZE", "STATE", "PROGRESS", "STARTED"
    );
    for s in snaps {
        println!(
            "{:<23} {:<22} {:>8} {:<10} {:>8} {:<25} {}",
            s.snapshot_id,
            s.volume_id,
            format_size(s.volume_size << 30),
            s.state,
            s.progress,
            s.start_time,
            s.description,
        );
    }
}

/// Prints the space rows of one volume (`ebs.describevolumespace` entry).
pub fn print_space(s: &VolumeSpace) {
    println!("allocated {}", format_size(s.allocated_bytes));
    println!("stored    {}", format_size(s.stored_bytes));
    println!("dead      {}", format_size(s.dead_bytes));
    println!("compression {:.2}x", s.compression_ratio);
}

/// A Hive `EBSRequest` for `id`.
pub fn ebs_request(id: &str) -> EbsRequest {
    EbsRequest {
        name: id.to_owned(),
        vol_type: "gp3".into(),
        boot: false,
        efi: false,
        delete_on_termination: false,
        nbd_uri: String::new(),
        device_name: String::new(),
        hotplug_port: None,
    }
}

/// How a command prints its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Prints `v` as JSON (through a `serde_json::Value`, whose keys print sorted, as the replies
/// always have), or as `table` prints it.
pub fn print<T: Serialize>(output: Output, v: &T, table: impl FnOnce(&T)) {
    match output {
        Output::Json => {
            let json = serde_json::to_value(v).and_then(|v| serde_json::to_string_pretty(&v));
            println!("{}", json.unwrap_or_default());
        }
        Output::Table => table(v),
    }
}
