//! Request and reply bodies of the `ebs.*` subjects, with EC2 field names
//! (`../shared/nats-api.md`; EC2 API reference: CreateVolume, DescribeVolumes, AttachVolume,
//! DetachVolume, DeleteVolume, ModifyVolume). Unknown fields are ignored; missing required fields
//! and wrong types are errors.

use serde::{Deserialize, Serialize};

/// An EC2 error code and message: `{"Error": {"Code", "Message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// EC2 error code.
    #[serde(rename = "Code")]
    pub code: String,
    /// Human-readable message.
    #[serde(rename = "Message")]
    pub message: String,
}

/// The error envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    #[serde(rename = "Error")]
    pub error: ApiError,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
    /// `MissingParameter`.
    pub fn missing(message: impl Into<String>) -> Self {
        Self::new("MissingParameter", message)
    }
    /// `InvalidParameterValue`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("InvalidParameterValue", message)
    }
    /// `InvalidVolume.NotFound`.
    pub fn volume_not_found(id: &str) -> Self {
        Self::new(
            "InvalidVolume.NotFound",
            format!("The volume '{id}' does not exist."),
        )
    }
    /// `InvalidSnapshot.NotFound`.
    pub fn snapshot_not_found(id: &str) -> Self {
        Self::new(
            "InvalidSnapshot.NotFound",
            format!("The snapshot '{id}' does not exist."),
        )
    }
    /// `InternalError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("InternalError", message)
    }

    /// Classifies a serde_json error: a missing field is `MissingParameter`, anything else
    /// (syntax, wrong type) `InvalidParameterValue`.
    pub fn from_json(e: &serde_json::Error) -> Self {
        let msg = e.to_string();
        if msg.starts_with("missing field") {
            Self::missing(msg)
        } else {
            Self::invalid(format!("invalid request body: {msg}"))
        }
    }
}

/// `{"Key", "Value"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// Key.
    #[serde(rename = "Key")]
    pub key: String,
    /// Value.
    #[serde(rename = "Value", default)]
    pub value: String,
}

/// `{"ResourceType": "volume", "Tags": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagSpecification {
    /// Must be `volume` for CreateVolume.
    #[serde(rename = "ResourceType", default)]
    pub resource_type: String,
    /// Tags.
    #[serde(rename = "Tags", default)]
    pub tags: Vec<Tag>,
}

/// `ebs.createvolume` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVolumeRequest {
    /// Size in GiB, 1..=16384; with `SnapshotId` it may be left out (the snapshot's size).
    #[serde(rename = "Size", skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Volume type (default `gp3`).
    #[serde(rename = "VolumeType", skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<String>,
    /// Availability zone (stored and echoed).
    #[serde(rename = "AvailabilityZone", skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// Create from this snapshot.
    #[serde(rename = "SnapshotId", skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Provisioned IOPS (stored and echoed; default 3000).
    #[serde(rename = "Iops", skip_serializing_if = "Option::is_none")]
    pub iops: Option<i64>,
    /// Tags.
    #[serde(rename = "TagSpecifications", skip_serializing_if = "Option::is_none")]
    pub tag_specifications: Option<Vec<TagSpecification>>,
    /// Idempotency token.
    #[serde(rename = "ClientToken", skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// EBS Multi-Attach (io1 and io2 only, as in EC2).
    #[serde(rename = "MultiAttachEnabled", skip_serializing_if = "Option::is_none")]
    pub multi_attach_enabled: Option<bool>,
}

/// `{"Name", "Values"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Filter {
    /// Filter name: `status`, `attachment.instance-id`, `tag:KEY`, `volume-id`.
    #[serde(rename = "Name")]
    pub name: String,
    /// Accepted values.
    #[serde(rename = "Values", default)]
    pub values: Vec<String>,
}

/// `ebs.describevolumes` request.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DescribeVolumesRequest {
    /// Only these volumes (each must exist).
    #[serde(rename = "VolumeIds", skip_serializing_if = "Option::is_none")]
    pub volume_ids: Option<Vec<String>>,
    /// Filters, all of which must match.
    #[serde(rename = "Filters", skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<Filter>>,
}

/// `ebs.attachvolume` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachVolumeRequest {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Instance.
    #[serde(rename = "InstanceId")]
    pub instance_id: String,
    /// Device name.
    #[serde(rename = "Device")]
    pub device: String,
}

/// `ebs.detachvolume` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachVolumeRequest {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Must match the attachment if given.
    #[serde(rename = "InstanceId", skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Must match the attachment if given.
    #[serde(rename = "Device", skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Detach even if mounted.
    #[serde(rename = "Force", default)]
    pub force: bool,
}

/// `ebs.deletevolume` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeIdRequest {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
}

/// `ebs.modifyvolume` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModifyVolumeRequest {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// New size in GiB (grow only).
    #[serde(rename = "Size")]
    pub size: i64,
}

/// EC2 `VolumeAttachment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttachment {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Instance.
    #[serde(rename = "InstanceId")]
    pub instance_id: String,
    /// Device.
    #[serde(rename = "Device")]
    pub device: String,
    /// `attaching` | `attached` | `detaching` | `detached`.
    #[serde(rename = "State")]
    pub state: String,
    /// RFC 3339.
    #[serde(rename = "AttachTime")]
    pub attach_time: String,
    /// Delete the volume when the instance terminates.
    #[serde(rename = "DeleteOnTermination")]
    pub delete_on_termination: bool,
}

/// EC2 `Volume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// `vol-` + 17 hex.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// GiB.
    #[serde(rename = "Size")]
    pub size: u64,
    /// Source snapshot or "".
    #[serde(rename = "SnapshotId")]
    pub snapshot_id: String,
    /// Availability zone.
    #[serde(rename = "AvailabilityZone")]
    pub availability_zone: String,
    /// `creating` | `available` | `in-use` | `deleting` | `deleted` | `error`.
    #[serde(rename = "State")]
    pub state: String,
    /// RFC 3339.
    #[serde(rename = "CreateTime")]
    pub create_time: String,
    /// Volume type.
    #[serde(rename = "VolumeType")]
    pub volume_type: String,
    /// IOPS.
    #[serde(rename = "Iops")]
    pub iops: u32,
    /// Attachments.
    #[serde(rename = "Attachments")]
    pub attachments: Vec<VolumeAttachment>,
    /// EBS Multi-Attach: attachable to several instances at once.
    #[serde(rename = "MultiAttachEnabled", default)]
    pub multi_attach_enabled: bool,
    /// Tags.
    #[serde(rename = "Tags")]
    pub tags: Vec<Tag>,
}

/// `ebs.describevolumes` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DescribeVolumesReply {
    /// Matching volumes.
    #[serde(rename = "Volumes")]
    pub volumes: Vec<Volume>,
}

/// `ebs.createsnapshot` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSnapshotRequest {
    /// Volume to snapshot.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Free text.
    #[serde(rename = "Description", default)]
    pub description: String,
}

/// `ebs.describesnapshots` request.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DescribeSnapshotsRequest {
    /// Only these snapshots (each must exist).
    #[serde(rename = "SnapshotIds", skip_serializing_if = "Option::is_none")]
    pub snapshot_ids: Option<Vec<String>>,
    /// Filters (`volume-id`, `status`, `snapshot-id`), all of which must match.
    #[serde(rename = "Filters", skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<Filter>>,
}

/// `ebs.deletesnapshot` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotIdRequest {
    /// Snapshot.
    #[serde(rename = "SnapshotId")]
    pub snapshot_id: String,
}

/// EC2 `Snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `snap-` + 17 hex.
    #[serde(rename = "SnapshotId")]
    pub snapshot_id: String,
    /// The volume it was taken of.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// That volume's size, GiB.
    #[serde(rename = "VolumeSize")]
    pub volume_size: u64,
    /// `pending` | `completed` | `error`.
    #[serde(rename = "State")]
    pub state: String,
    /// RFC 3339.
    #[serde(rename = "StartTime")]
    pub start_time: String,
    /// `NN%`.
    #[serde(rename = "Progress")]
    pub progress: String,
    /// Free text.
    #[serde(rename = "Description")]
    pub description: String,
}

/// `ebs.describesnapshots` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DescribeSnapshotsReply {
    /// Matching snapshots.
    #[serde(rename = "Snapshots")]
    pub snapshots: Vec<Snapshot>,
}

/// `ebs.describevolumespace` request (a vblock extension, not EC2).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DescribeVolumeSpaceRequest {
    /// Only these volumes (each must exist); all when absent.
    #[serde(rename = "VolumeIds", skip_serializing_if = "Option::is_none")]
    pub volume_ids: Option<Vec<String>>,
}

/// Space used by one volume (`ebs.describevolumespace`); every size in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSpace {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// Logical size.
    #[serde(rename = "SizeBytes")]
    pub size_bytes: u64,
    /// Blocks holding data x 4096 (shared blocks of a clone included).
    #[serde(rename = "AllocatedBytes")]
    pub allocated_bytes: u64,
    /// Chunk objects this volume wrote that still exist.
    #[serde(rename = "StoredBytes")]
    pub stored_bytes: u64,
    /// Of those, bytes its map no longer uses (reclaimed by compaction and GC).
    #[serde(rename = "DeadBytes")]
    pub dead_bytes: u64,
    /// Logical data bytes per stored byte.
    #[serde(rename = "CompressionRatio")]
    pub compression_ratio: f64,
}

/// `ebs.describevolumespace` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DescribeVolumeSpaceReply {
    /// One entry per volume.
    #[serde(rename = "VolumeSpaces")]
    pub volume_spaces: Vec<VolumeSpace>,
}

/// `{"Return": true}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReturnReply {
    /// Always true on success.
    #[serde(rename = "Return")]
    pub ret: bool,
}

/// EC2 `VolumeModification`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeModification {
    /// Volume.
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    /// New size, GiB.
    #[serde(rename = "TargetSize")]
    pub target_size: u64,
    /// Old size, GiB.
    #[serde(rename = "OriginalSize")]
    pub original_size: u64,
    /// `completed` (the resize is immediate).
    #[serde(rename = "ModificationState")]
    pub modification_state: String,
}

/// `ebs.modifyvolume` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModifyVolumeReply {
    /// The modification.
    #[serde(rename = "VolumeModification")]
    pub volume_modification: VolumeModification,
}

/// Hive `EBSRequest` (mount, unmount).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EbsRequest {
    /// The VolumeId.
    #[serde(rename = "Name")]
    pub name: String,
    /// Volume type (informational).
    #[serde(rename = "VolType", default)]
    pub vol_type: String,
    /// Boot volume (informational).
    #[serde(rename = "Boot", default)]
    pub boot: bool,
    /// EFI (informational).
    #[serde(rename = "EFI", default)]
    pub efi: bool,
    /// Delete on termination.
    #[serde(rename = "DeleteOnTermination", default)]
    pub delete_on_termination: bool,
    /// URI the platform expects (informational).
    #[serde(rename = "NBDURI", default)]
    pub nbd_uri: String,
    /// Device name.
    #[serde(rename = "DeviceName", default)]
    pub device_name: String,
    /// Hotplug port (informational).
    #[serde(
        rename = "HotplugPort",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_port: Option<i64>,
}

/// Hive `EBSMountResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsMountResponse {
    /// `nbd://HOST:PORT/VolumeId`.
    #[serde(rename = "URI")]
    pub uri: String,
    /// True when mounted.
    #[serde(rename = "Mounted")]
    pub mounted: bool,
    /// Empty on success.
    #[serde(rename = "Error")]
    pub error: String,
    /// True when retrying may succeed.
    #[serde(rename = "Retryable")]
    pub retryable: bool,
}

/// Hive `EBSUnMountResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsUnmountResponse {
    /// The VolumeId.
    #[serde(rename = "Volume")]
    pub volume: String,
    /// False once unmounted.
    #[serde(rename = "Mounted")]
    pub mounted: bool,
    /// Empty on success.
    #[serde(rename = "Error")]
    pub error: String,
    /// True when the volume does not exist.
    #[serde(rename = "NotFound")]
    pub not_found: bool,
}

/// Hive `ebs.delete` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EbsDeleteRequest {
    /// The VolumeId.
    #[serde(rename = "Volume")]
    pub volume: String,
}

/// Hive `ebs.delete` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsDeleteResponse {
    /// The VolumeId.
    #[serde(rename = "Volume")]
    pub volume: String,
    /// True when deleted.
    #[serde(rename = "Success")]
    pub success: bool,
    /// Empty on success.
    #[serde(rename = "Error")]
    pub error: String,
}
