//! Taking a volume over from another node (docs/design/cluster.md, "Fence"): a new epoch, a
//! fence in the shipped WAL, then the volume rebuilt from the backend alone, numbered in the
//! new epoch. The node it was taken from can store nothing the new owner reads: its next
//! shipped WAL object is refused (so it acknowledges no more flushes), its chunk ids and map
//! checkpoints sort below the new epoch's.

use std::time::Duration;

use crate::backend::{volume_prefix, volume_record_key, wal_object_counters, wal_object_key};
use crate::cluster::epoch::{take_epoch, EpochError, TakeOver};
use crate::cluster::walobj::encode_fence;
use crate::engine::{now_rfc3339, Engine};
use crate::ids::VolumeId;
use crate::records::VolumeRecord;
use crate::recovery::{OnDamage, Progress};
use crate::retry::put_if_absent_retried;
use crate::volume::VolumeError;

impl From<EpochError> for VolumeError {
    fn from(e: EpochError) -> Self {
        match e {
            EpochError::Backend(b) => VolumeError::Backend(b),
            EpochError::Corrupt { key, reason } => VolumeError::Corrupt { what: key, reason },
            e @ EpochError::ConditionIgnored { .. } => VolumeError::Internal(e.to_string()),
        }
    }
}

impl Engine {
    /// Takes volume `id` over for node `node` (`--node`) and returns the new epoch. In order:
    ///
    /// 1. The next epoch's manifest (`VOLUMEID/epoch/E`, conditional PUT): of racing takers one
    ///    wins; the others get [`VolumeError::InUse`] naming the winner.
    /// 2. A fence at the shipped WAL's next counter (conditional PUT, after the highest listed;
    ///    again after a refusal). The old owner's next object is refused from then on, and
    ///    since every flush it acknowledged was confirmed by an object stored before the fence
    ///    (volume/ship.rs), everything it acknowledged is in the backend now.
    /// 3. Read only now: the record copy, the newest map checkpoint, the chunks above it and
    ///    the shipped WAL chain, installed here as by disaster recovery (any local state of the
    ///    volume is replaced; its shipped records go into the local WAL).
    /// 4. Chunk object ids from the epoch's base (`E << 40`; seqs too, at the open), and a map
    ///    checkpoint under that id, stored before the volume opens: recovery from the backend
    ///    starts from it, above every id the old owner can still write.
    ///
    /// The volume is closed here first if it is open (without a drain) and is left closed;
    /// its next open serves it. Needs `VolumeConfig::ship_wal` (without shipped WAL, the old
    /// owner's flushed writes that are only in its local WAL would be lost).
    ///
    /// Known gap (docs/design/cluster.md, "Constraints"): the old owner's checkpoint pruning is
    /// not fenced (its garbage collection is: it confirms its writer first).
    ///
    /// Errors: [`VolumeError::InvalidArgument`] without WAL shipping; [`VolumeError::InUse`]
    /// when another node took this epoch; [`VolumeError::VolumeNotFound`] without a record
    /// copy in the backend; backend, metadata and WAL errors (the takeover may be retried: it
    /// then takes the next epoch).
    pub async fn take_over(&self, id: &VolumeId, node: &str) -> Result<u64, VolumeError> {
        self.take_over_with(id, node, None, OnDamage::Refuse).await
    }

    /// [`Engine::take_over`] with the volume's record `record` when the caller has it (cluster
    /// mode: the catalog's), instead of the record copy in the backend, and `damage` telling
    /// what a damaged bucket does to the rebuild ([`OnDamage::Refuse`]: the takeover fails
    /// with [`VolumeError::Corrupt`] and the backend keeps every object of the volume).
    pub async fn take_over_with(
        &self,
        id: &VolumeId,
        node: &str,
        record: Option<VolumeRecord>,
        damage: OnDamage,
    ) -> Result<u64, VolumeError> {
        if !self.config.volume.ship_wal {
            return Err(VolumeError::InvalidArgument(
                "a takeover needs WAL shipping (--ship-wal)".into(),
            ));
        }
        let started = std::time::Instant::now();
        let mut epoch = 0;
        let e = &mut epoch;
        let taken = self
            .close_then(id, Duration::ZERO, || async move {
                let _gc = self.gc.lock().await;
                *e = self.take_over_closed(id, node, record, damage).await?;
                Ok(())
            })
            .await;
        let result = match &taken {
            Ok(()) => "ok",
            Err(VolumeError::InUse(_)) => "lost",
            Err(_) => "error",
        };
        metrics::counter!("vblock_takeovers_total", "result" => result).increment(1);
        metrics::histogram!("vblock_takeover_duration_seconds", "result" => result)
            .record(started.elapsed().as_secs_f64());
        taken.map(|()| epoch)
    }

    /// [`Engine::take_over`] of a volume that is closed here and stays so.
    async fn take_over_closed(
        &self,
        id: &VolumeId,
        node: &str,
        record: Option<VolumeRecord>,
        damage: OnDamage,
    ) -> Result<u64, VolumeError> {
        let epoch = match take_epoch(&*self.backend, id, node, now_rfc3339()).await? {
            TakeOver::Taken(m) => m.epoch,
            TakeOver::Lost(m) => {
                return Err(VolumeError::InUse(format!(
                    "volume {id} was taken over by node {} (epoch {}) first",
                    m.node, m.epoch
                )))
            }
        };
        crate::crash_point!("takeover-after-epoch");
        let fence_at = self.fence(id, epoch).await?;
        crate::crash_point!("takeover-after-fence");
        tracing::info!(volume = %id, epoch, node, fence = fence_at, "took the volume over; rebuilding it from the backend");
        let rec: VolumeRecord = match record {
            Some(rec) => rec,
            None => self
                .stored_record(&volume_record_key(id), "volume")
                .await?
                .ok_or_else(|| VolumeError::VolumeNotFound(id.clone()))?,
        };
        // Local state of an earlier ownership is stale: without its record the volume does not
        // open until the rebuild below has stored the new one, after the new checkpoint. Its
        // map and chunk stats stay until the rebuild replaces them (emptied stats would let GC
        // delete chunks the volume needs if the rebuild failed).
        // Its local WAL goes only once the rebuild found no damage (recover_volume): records
        // there may be the last good copy of what a damaged bucket lost.
        let (meta, vol) = (self.meta.clone(), id.clone());
        crate::meta::blocking(move || meta.forget_volume_record(&vol)).await?;
        let keys = self.backend.list(&volume_prefix(id)).await?;
        let none = |_, _| {};
        let mut progress = Progress::new(0, &none);
        self.recover_volume(rec, &keys, Some(epoch), damage, &mut progress)
            .await?;
        Ok(epoch)
    }

    /// Stores epoch `epoch`'s fence at the shipped WAL's next counter (after the highest
    /// listed), listing again after a refusal. Returns its counter.
    async fn fence(&self, id: &VolumeId, epoch: u64) -> Result<u64, VolumeError> {
        loop {
            let keys = self
                .backend
                .list(&crate::backend::wal_object_prefix(id))
                .await?;
            let at = wal_object_counters(id, &keys)
                .last()
                .map_or(1, |c| c.saturating_add(1));
            let key = wal_object_key(id, at);
            if put_if_absent_retried(&self.backend, &key, encode_fence(epoch, at, 0)).await? {
                return Ok(at);
            }
        }
    }

    /// Empties volume `id`'s local WAL directory (records of an earlier ownership here are
    /// stale; the backend's chain replaces them). The lock file stays.
    pub(crate) fn clear_local_wal(&self, id: &VolumeId) -> Result<(), VolumeError> {
        let dir = self.config.wal_dir.join(id.as_str());
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(VolumeError::Io {
                    what: format!("listing {}", dir.display()),
                    source,
                })
            }
        };
        for entry in entries {
            let path = entry
                .map_err(|source| VolumeError::Io {
                    what: format!("listing {}", dir.display()),
                    source,
                })?
                .path();
            if path.file_name().is_some_and(|n| n != "LOCK") {
                std::fs::remove_file(&path).map_err(|source| VolumeError::Io {
                    what: format!("removing {}", path.display()),
                    source,
                })?;
            }
        }
        Ok(())
    }
}
