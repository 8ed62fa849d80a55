//! The cluster's catalog in a JetStream KV bucket (docs/design/cluster.md, "Catalog"): every
//! volume and snapshot record of the cluster, so that any daemon answers every `ebs.*` request.
//! Keys are `volume.VOLUMEID` and `snapshot.SNAPSHOTID`; values are the records' JSON
//! ([`VolumeRecord`], [`SnapshotRecord`], mounts included). Writes are compare-and-set on the
//! key's revision: a read-modify-write that lost a race is refused ([`CatalogError::Changed`]),
//! never applied over the other writer's record.
//!
//! The catalog says what exists; the data (chunks, checkpoints, shipped WAL, snapshot maps) is
//! in the bucket, and the volume's owner holds its map in its local metadata.

use async_nats::jetstream::kv::{self, Operation, Store};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ids::{SnapshotId, VolumeId};
use crate::records::{SnapshotRecord, VolumeRecord};

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The KV bucket could not be reached or answered with an error.
    #[error("JetStream KV: {0}")]
    Kv(String),
    /// The record changed (or appeared, or went) since it was read: re-read and try again.
    #[error("{0} was changed by another request meanwhile; try again")]
    Changed(String),
    /// A record's value does not decode.
    #[error("the catalog record {key} is corrupt: {reason}")]
    Corrupt {
        /// KV key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn kv_err(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Kv(e.to_string())
}

/// The catalog of a cluster: one KV bucket.
pub struct Catalog {
    kv: Store,
}

impl Catalog {
    /// The catalog in KV bucket `bucket` (created, one value per key and `replicas` copies, if
    /// missing).
    ///
    /// Errors: [`CatalogError::Kv`] when JetStream is off or unreachable, or cannot keep
    /// `replicas` copies.
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, CatalogError> {
        Ok(Self {
            kv: super::open_bucket(client, bucket, replicas)
                .await
                .map_err(kv_err)?,
        })
    }

    fn volume_key(id: &VolumeId) -> String {
        format!("volume.{id}")
    }

    fn snapshot_key(id: &SnapshotId) -> String {
        format!("snapshot.{id}")
    }

    /// `token.HEX`: EC2 `ClientToken` `token`, its bytes in lowercase hex (KV keys take only
    /// `[-/_=.a-zA-Z0-9]`; a token is up to 64 ASCII characters).
    fn token_key(token: &str) -> String {
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        format!("token.{hex}")
    }

    /// Claims EC2 `ClientToken` `token` for new volume `rec` (key `token.HEX`, created only if
    /// absent), so that one volume is created per token whichever nodes its retries reach
    /// (EC2 CreateVolume, "Ensuring idempotency"). Returns `None` when this call claimed it,
    /// else the record the token was claimed for and the claim's revision.
    ///
    /// Errors: [`CatalogError::Changed`] when claims and releases keep racing (8 rounds);
    /// [`CatalogError::Corrupt`]; [`CatalogError::Kv`].
    pub async fn claim_token(
        &self,
        token: &str,
        rec: &VolumeRecord,
    ) -> Result<Option<(VolumeRecord, u64)>, CatalogError> {
        let key = Self::token_key(token);
        for _ in 0..8 {
            match self.put(&key, rec, None).await {
                Ok(_) => return Ok(None),
                Err(CatalogError::Changed(_)) => {
                    // Released between the create and the read: claim again.
                    if let Some(claimed) = self.get(&key).await? {
                        return Ok(Some(claimed));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(CatalogError::Changed(key))
    }

    /// Releases ClientToken `token` if it is claimed for volume `volume` (deleted, or never
    /// made it into the catalog): a new request with the token then creates a new volume. A
    /// claim for another volume stays.
    ///
    /// Errors: [`CatalogError::Corrupt`]; [`CatalogError::Kv`].
    pub async fn release_token(&self, token: &str, volume: &VolumeId) -> Result<(), CatalogError> {
        let key = Self::token_key(token);
        match self.get::<VolumeRecord>(&key).await? {
            Some((rec, revision)) if rec.volume_id == *volume => {
                match self.delete(&key, revision).await {
                    // Released (and perhaps claimed anew) by another request meanwhile.
                    Err(CatalogError::Changed(_)) => Ok(()),
                    r => r,
                }
            }
            _ => Ok(()),
        }
    }

    /// Volume `id`'s record and its revision (for [`Catalog::put_volume`]), if it exists.
    pub async fn volume(&self, id: &VolumeId) -> Result<Option<(VolumeRecord, u64)>, CatalogError> {
        self.get(&Self::volume_key(id)).await
    }

    /// Every volume record, ordered by id.
    pub async fn volumes(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        let mut recs: Vec<VolumeRecord> = self.list("volume.").await?;
        recs.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(recs)
    }

    /// Stores volume record `rec`: a new one when `revision` is `None`, else a replacement of
    /// the one read at `revision`. Returns the new revision.
    ///
    /// Errors: [`CatalogError::Changed`] when the key is not as read (it exists, for a new
    /// one); [`CatalogError::Kv`].
    pub async fn put_volume(
        &self,
        rec: &VolumeRecord,
        revision: Option<u64>,
    ) -> Result<u64, CatalogError> {
        self.put(&Self::volume_key(&rec.volume_id), rec, revision)
            .await
    }

    /// Removes volume `id`'s record, read at `revision`.
    ///
    /// Errors: [`CatalogError::Changed`]; [`CatalogError::Kv`].
    pub async fn delete_volume(&self, id: &VolumeId, revision: u64) -> Result<(), CatalogError> {
        self.delete(&Self::volume_key(id), revision).await
    }

    /// Snapshot `id`'s record and its revision, if it exists.
    pub async fn snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<(SnapshotRecord, u64)>, CatalogError> {
        self.get(&Self::snapshot_key(id)).await
    }

    /// Every snapshot record, ordered by id.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let mut recs: Vec<SnapshotRecord> = self.list("snapshot.").await?;
        recs.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        Ok(recs)
    }

    /// Stores snapshot record `rec` as [`Catalog::put_volume`] does volume records.
    pub async fn put_snapshot(
        &self,
        rec: &SnapshotRecord,
        revision: Option<u64>,
    ) -> Result<u64, CatalogError> {
        self.put(&Self::snapshot_key(&rec.snapshot_id), rec, revision)
            .await
    }

    /// Records the outcome of storing snapshot `done` (its `state` and `progress`) over the
    /// catalog's record as it is now, so that a change made while it was being stored (a
    /// mount) stays; re-read and written again when another write lands in between. Nothing
    /// to do when the record is gone.
    ///
    /// Errors: [`CatalogError::Changed`] after 8 lost races in a row; KV errors.
    pub async fn finish_snapshot(&self, done: &SnapshotRecord) -> Result<(), CatalogError> {
        for _ in 0..8 {
            let Some((mut rec, revision)) = self.snapshot(&done.snapshot_id).await? else {
                return Ok(());
            };
            (rec.state, rec.progress) = (done.state, done.progress);
            match self.put_snapshot(&rec, Some(revision)).await {
                Err(CatalogError::Changed(_)) => continue,
                r => return r.map(|_| ()),
            }
        }
        Err(CatalogError::Changed(Self::snapshot_key(&done.snapshot_id)))
    }

    /// Removes snapshot `id`'s record, read at `revision`.
    pub async fn delete_snapshot(
        &self,
        id: &SnapshotId,
        revision: u64,
    ) -> Result<(), CatalogError> {
        self.delete(&Self::snapshot_key(id), revision).await
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, CatalogError> {
        match self.kv.entry(key).await.map_err(kv_err)? {
            Some(e) if e.operation == Operation::Put => {
                let rec =
                    serde_json::from_slice(&e.value).map_err(|err| CatalogError::Corrupt {
                        key: key.to_owned(),
                        reason: err.to_string(),
                    })?;
                Ok(Some((rec, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, CatalogError> {
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(kv_err)?,
            Err(e) => return Err(kv_err(e)),
        };
        let mut out = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with(prefix)) {
            // Deleted between the listing and the read: not listed.
            if let Some((rec, _)) = self.get(key).await? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    async fn put<T: Serialize>(
        &self,
        key: &str,
        rec: &T,
        revision: Option<u64>,
    ) -> Result<u64, CatalogError> {
        let body = Bytes::from(serde_json::to_vec(rec).map_err(kv_err)?);
        match revision {
            None => match self.kv.create(key, body).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Err(CatalogError::Changed(key.to_owned()))
                }
                Err(e) => Err(kv_err(e)),
            },
            Some(revision) => match self.kv.update(key, body, revision).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    Err(CatalogError::Changed(key.to_owned()))
                }
                Err(e) => Err(kv_err(e)),
            },
        }
    }

    async fn delete(&self, key: &str, revision: u64) -> Result<(), CatalogError> {
        match self.kv.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
                Err(CatalogError::Changed(key.to_owned()))
            }
            Err(e) => Err(kv_err(e)),
        }
    }
}
