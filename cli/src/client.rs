//! Management commands: requests to a running daemon over NATS, using the `ebs.*` contract.

use std::time::Duration;

use serde_json::{json, Value};

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

    /// Sends `body` on `subject` and returns the reply; an `{"Error": ...}` reply is an error.
    pub async fn request(&self, subject: &str, body: Value) -> Result<Value, ClientError> {
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
pub fn print_volumes(volumes: &[Value]) {
    println!(
        "{:<22} {:>8} {:<10} {:<10} {:<20} {:<25}",
        "VOLUME ID", "SIZE", "STATE", "TYPE", "ATTACHED TO", "CREATED"
    );
    for v in volumes {
        let attached: Vec<&str> = v["Attachments"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["InstanceId"].as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<22} {:>8} {:<10} {:<10} {:<20} {:<25}",
            v["VolumeId"].as_str().unwrap_or(""),
            format_size(v["Size"].as_u64().unwrap_or(0) << 30),
            v["State"].as_str().unwrap_or(""),
            v["VolumeType"].as_str().unwrap_or(""),
            if attached.is_empty() {
                "-".to_owned()
            } else {
                attached.join(",")
            },
            v["CreateTime"].as_str().unwrap_or(""),
        );
    }
}

/// A Hive `EBSRequest` for `id`.
pub fn ebs_request(id: &str) -> Value {
    json!({"Name": id, "VolType": "gp3", "Boot": false, "EFI": false, "DeleteOnTermination": false, "NBDURI": "", "DeviceName": ""})
}
