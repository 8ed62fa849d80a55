//! Epoch manifests: the fence that admits one writer per volume (docs/design/cluster.md,
//! "Fence"; format in FORMAT.md, "Epoch manifest"). A node that takes a volume over writes the
//! next epoch's manifest with [`Backend::put_if_absent`]: of racing takers exactly one stores
//! it, whatever the KV lease said, and the highest epoch present is the volume's writer.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{epoch_key, epoch_prefix, Backend, BackendError};
use crate::ids::VolumeId;

/// Bits of a chunk object id or a sequence number below its epoch: epoch E's owner numbers its
/// chunk objects and its records from `E << EPOCH_SHIFT`, so two owners of a volume never
/// write the same object id or hand out the same seq (docs/design/cluster.md).
pub const EPOCH_SHIFT: u32 = 40;

/// The epoch a chunk object id (or a volume's next object id) belongs to.
pub fn epoch_of(object_id: u64) -> u64 {
    object_id >> EPOCH_SHIFT
}

/// The first chunk object id, and the floor of the sequence numbers, of `epoch`.
pub fn epoch_base(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// The manifest format this build writes and reads.
pub const EPOCH_MANIFEST_VERSION: u32 = 1;

/// `VOLUMEID/epoch/EPOCH` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochManifest {
    /// [`EPOCH_MANIFEST_VERSION`].
    pub version: u32,
    /// The epoch, from 1; the key's number.
    pub epoch: u64,
    /// The node that took it (`--node`).
    pub node: String,
    /// RFC 3339 time it was taken.
    pub time: String,
    /// 16 random hex digits: a taker whose PUT was retried (its first attempt stored, the
    /// answer lost) knows its own manifest from another node's.
    #[serde(default)]
    pub nonce: String,
}

/// Errors of the epoch layer.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A manifest does not decode, or has a version this build does not know.
    #[error("epoch manifest {key} is unreadable: {reason}")]
    Corrupt {
        /// Object key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store does not honour conditional PUTs (`If-None-Match: *`): it cannot fence
    /// ([`check_conditional_put`]).
    #[error("the object store does not honour conditional PUTs (If-None-Match: *): of two on new key {key}, it stored {stored} (1 expected); cluster mode's fencing needs a store that refuses the second (AWS S3 does)")]
    ConditionIgnored {
        /// The probe object's key.
        key: String,
        /// How many of the two PUTs it stored.
        stored: u32,
    },
}

/// Checks that `backend` refuses a conditional PUT over an existing object, the primitive
/// every fence of cluster mode rests on (S3 `PutObject` with `If-None-Match: *`; a store that
/// ignores the header stores every epoch manifest and WAL object a stale owner writes). Stores
/// probe object `cluster-probe/NODE/NANOS` ([`crate::backend::probe_key`]) with
/// [`Backend::put_if_absent`] twice, with different bodies, expects the second refused, and
/// deletes it (also when a step fails). A PUT answered "exists" counts as stored when the
/// object holds its body (a retry that found its own attempt, or a store that overwrote). This shows the
/// condition is honoured, not that racing PUTs are atomic (docs/design/cluster.md).
///
/// Errors: [`EpochError::ConditionIgnored`]; [`EpochError::Backend`] when the store fails.
pub async fn check_conditional_put(backend: &dyn Backend, node: &str) -> Result<(), EpochError> {
    let key = crate::backend::probe_key(node);
    let (first, second) = (
        Bytes::from(format!("{key} 1")),
        Bytes::from(format!("{key} 2")),
    );
    let probed = async {
        let stored_first =
            backend.put_if_absent(&key, first.clone()).await? || backend.get(&key).await? == first;
        let stored_second = backend.put_if_absent(&key, second.clone()).await?
            || backend.get(&key).await? == second;
        Ok::<_, EpochError>((stored_first, stored_second))
    }
    .await;
    let deleted = backend.delete(&key).await;
    let (stored_first, stored_second) = probed?;
    deleted?;
    match (stored_first, stored_second) {
        (true, false) => Ok(()),
        // Both stored; or the first refused on a key nobody else writes (a store that refuses
        // every conditional PUT cannot take an epoch either).
        _ => Err(EpochError::ConditionIgnored {
            key,
            stored: u32::from(stored_first) + u32::from(stored_second),
        }),
    }
}

/// The outcome of [`take_epoch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// This node stored the manifest: it is the volume's writer from now on.
    Taken(EpochManifest),
    /// Another node stored the same epoch first: it is the writer.
    Lost(EpochManifest),
}

/// The highest epoch number among `volume`'s manifests (0: none yet).
pub async fn highest_epoch(backend: &dyn Backend, volume: &VolumeId) -> Result<u64, EpochError> {
    let prefix = epoch_prefix(volume);
    Ok(backend
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .max()
        .unwrap_or(0))
}

/// Reads `volume`'s manifest of `epoch`.
///
/// Errors: [`BackendError::NotFound`] (as [`EpochError::Backend`]) when there is none;
/// [`EpochError::Corrupt`].
pub async fn read_epoch(
    backend: &dyn Backend,
    volume: &VolumeId,
    epoch: u64,
) -> Result<EpochManifest, EpochError> {
    let key = epoch_key(volume, epoch);
    let body = backend.get(&key).await?;
    let m: EpochManifest = serde_json::from_slice(&body).map_err(|e| EpochError::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    if m.version != EPOCH_MANIFEST_VERSION || m.epoch != epoch {
        return Err(EpochError::Corrupt {
            key,
            reason: format!(
                "version {} epoch {} (this build reads version {EPOCH_MANIFEST_VERSION})",
                m.version, m.epoch
            ),
        });
    }
    Ok(m)
}

/// Takes `volume` over for `node`: stores the manifest of the epoch after the highest present.
/// [`TakeOver::Lost`] with the winner's manifest when another node stored that epoch first.
///
/// Errors: [`EpochError`]; a transient backend error may be retried (the next attempt looks
/// at the epochs again).
pub async fn take_epoch(
    backend: &dyn Backend,
    volume: &VolumeId,
    node: &str,
    time: String,
) -> Result<TakeOver, EpochError> {
    let epoch = highest_epoch(backend, volume).await? + 1;
    let m = EpochManifest {
        version: EPOCH_MANIFEST_VERSION,
        epoch,
        node: node.to_owned(),
        time,
        nonce: format!("{:016x}", rand::random::<u64>()),
    };
    let body = Bytes::from(serde_json::to_vec(&m).map_err(|e| EpochError::Corrupt {
        key: epoch_key(volume, epoch),
        reason: e.to_string(),
    })?);
    if backend
        .put_if_absent(&epoch_key(volume, epoch), body)
        .await?
    {
        Ok(TakeOver::Taken(m))
    } else {
        let there = read_epoch(backend, volume, epoch).await?;
        if there == m {
            Ok(TakeOver::Taken(m))
        } else {
            Ok(TakeOver::Lost(there))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;

    /// Takeovers number epochs from 1 up; of racing takers of one epoch exactly one wins and
    /// the others are told who.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_taker_wins_each_epoch() {
        let b = std::sync::Arc::new(MemoryBackend::new());
        let vol = VolumeId::generate();
        assert_eq!(highest_epoch(&*b, &vol).await.unwrap(), 0);
        let TakeOver::Taken(first) = take_epoch(&*b, &vol, "a", "t".into()).await.unwrap() else {
            panic!("the first takeover lost");
        };
        assert_eq!((first.epoch, first.node.as_str()), (1, "a"));
        let mut takers = Vec::new();
        for node in ["b", "c", "d", "e"] {
            let (b, vol) = (b.clone(), vol.clone());
            takers.push(tokio::spawn(async move {
                take_epoch(&*b, &vol, node, "t".into()).await.unwrap()
            }));
        }
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for t in takers {
            match t.await.unwrap() {
                TakeOver::Taken(m) => won.push(m),
                TakeOver::Lost(m) => lost.push(m),
            }
        }
        // Each epoch has one winner; a taker that read an older highest epoch loses to the
        // winner of that epoch.
        let mut epochs: Vec<u64> = won.iter().map(|m| m.epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        assert_eq!(epochs.len(), won.len(), "two takers won one epoch: {won:?}");
        for m in &lost {
            assert!(won.contains(m), "a loser was told {m:?}, not a winner");
        }
        let top = highest_epoch(&*b, &vol).await.unwrap();
        assert_eq!(read_epoch(&*b, &vol, top).await.unwrap().epoch, top);
    }

    #[tokio::test]
    async fn an_unknown_manifest_version_is_refused() {
        let b = MemoryBackend::new();
        let vol = VolumeId::generate();
        let body = br#"{"version":2,"epoch":1,"node":"x","time":"t","nonce":"0"}"#;
        b.put(&epoch_key(&vol, 1), Bytes::from_static(body))
            .await
            .unwrap();
        assert!(matches!(
            read_epoch(&b, &vol, 1).await,
            Err(EpochError::Corrupt { .. })
        ));
    }
}
