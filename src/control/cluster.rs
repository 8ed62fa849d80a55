//! Cluster mode's control plane (`vblock serve --cluster`; docs/design/cluster.md): records
//! live in the cluster's catalog (JetStream KV), and a volume is served by the node that holds
//! its lease. A mount claims the lease (waiting out the holder's TTL if it stopped renewing),
//! takes the volume over in a new epoch when this node is not its current writer
//! (`Engine::take_over`: fence, rebuild from the backend), and keeps the lease while mounted;
//! the lease's value carries the mount URI, which a mount answered by any other node returns
//! while the owner is alive. A lost lease closes the volume here; an unmount releases it.
//! Requests that need the volume's newest map (a snapshot) are forwarded to its owner on
//! `vblock.NODE.OP`, the node-addressed copy of every `ebs.*` operation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::catalog::{Catalog, CatalogError};
use crate::cluster::lease::{Claim, Kept, Leases, Owner};
use crate::ids::SnapshotId;
use crate::ids::VolumeId;
use crate::records::{SnapshotRecord, VolumeRecord, VolumeStateName};
use crate::recovery::OnDamage;
use crate::volume::VolumeError;

use super::api::ApiError;
use super::handlers::{body, usable, Control};

/// How long a request forwarded to a volume's owner may take (a snapshot flushes the
/// volume's write buffer into chunks first).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `describevolumespace` forwarded to a volume's owner may take (the owner reads
/// its map's stats: a hung owner must not hold a listing for [`FORWARD_TIMEOUT`]).
pub(super) const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Cluster mode's state in the control plane.
pub struct ClusterMode {
    leases: Arc<Leases>,
    /// Every volume and snapshot record of the cluster.
    pub(super) catalog: Catalog,
    /// The NATS connection: requests forwarded to other nodes.
    client: async_nats::Client,
    /// This daemon process as a lease holder (node name, random instance).
    pub(super) me: Owner,
    /// Leases this node keeps, by volume, and what for (the mutex is held only for map
    /// operations, never across an await).
    kept: std::sync::Mutex<HashMap<VolumeId, Held>>,
    /// How long a half-made catalog entry must stay unchanged before it counts as abandoned
    /// (`--abandon-after`; [`ClusterMode::abandoned`]).
    abandon_after: Duration,
    /// Half-made catalog entries this node has looked at ([`ClusterMode::abandoned`]).
    seen: std::sync::Mutex<HashMap<String, Seen>>,
}

/// A half-made catalog entry as this node saw it: its revision and creation time (together they
/// tell a new record from the old one, even in a catalog bucket made anew, whose revisions start
/// again), when this node first saw it so and when it last looked (this node's monotonic
/// clock).
struct Seen {
    revision: u64,
    created: String,
    first: Instant,
    last: Instant,
}

/// Entries of [`ClusterMode::abandoned`]'s table not looked at for this long are forgotten
/// (their next look starts the wait again: the safe direction), so the table stays small.
const SEEN_FORGOTTEN_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What a lease is kept for: the lease is released when nothing holds it any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The volume is mounted here.
    Mount,
    /// A snapshot taken here is not yet stored in the bucket (until then only this node's
    /// garbage collection knows its references).
    Snapshot,
    /// The volume is being deleted here.
    Delete,
    /// The mount of an owner that does not answer is being ended here (an unmount or detach
    /// through this node).
    EndMount,
}

/// A kept lease and its holders.
struct Held {
    kept: Kept,
    /// This claim of the lease among this process's claims (a hold taken under one claim is
    /// not dropped from a later one: [`ClusterMode::release_claim`]).
    claim: u64,
    mount: bool,
    snapshots: u32,
    delete: bool,
    /// Unmounts or detaches ending a silent owner's mount here.
    ending: u32,
}

impl Held {
    fn add(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Mount => self.mount = true,
            Purpose::Snapshot => self.snapshots += 1,
            Purpose::Delete => self.delete = true,
            Purpose::EndMount => self.ending += 1,
        }
    }

    /// Drops one `purpose` hold; whether any hold is left.
    fn drop_hold(&mut self, purpose: Purpose) -> bool {
        match purpose {
            Purpose::Mount => self.mount = false,
            Purpose::Snapshot => self.snapshots = self.snapshots.saturating_sub(1),
            Purpose::Delete => self.delete = false,
            Purpose::EndMount => self.ending = self.ending.saturating_sub(1),
        }
        self.mount || self.snapshots > 0 || self.delete || self.ending > 0
    }
}

impl ClusterMode {
    /// Cluster mode for node `node` with `leases` and `catalog`, forwarding through `client`;
    /// half-made catalog entries count as abandoned after `abandon_after`.
    pub fn new(
        leases: Leases,
        catalog: Catalog,
        client: async_nats::Client,
        node: &str,
        abandon_after: Duration,
    ) -> Self {
        Self {
            leases: Arc::new(leases),
            catalog,
            client,
            me: Owner::new(node, 0, ""),
            kept: std::sync::Mutex::new(HashMap::new()),
            abandon_after,
            seen: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether half-made catalog entry `key` (a ClientToken claim without its volume, a clone
    /// left `creating`) at `revision` counts as abandoned by the node that made it: this node
    /// has seen it at that revision for at least `--abandon-after`, on its own monotonic
    /// clock. The first look starts the wait; a new revision starts it again. No other node's
    /// clock is trusted: the record's creation time comes from its creator's, which may be
    /// off by more than the wait (the lease rule: docs/design/cluster.md, "Leases").
    pub(super) fn abandoned(&self, key: &str, revision: u64, created: &str) -> bool {
        let now = Instant::now();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.retain(|_, s| now.duration_since(s.last) < SEEN_FORGOTTEN_AFTER);
        match seen.get_mut(key) {
            Some(s) if s.revision == revision && s.created == created => {
                s.last = now;
                now.duration_since(s.first) >= self.abandon_after
            }
            _ => {
                let s = Seen {
                    revision,
                    created: created.to_owned(),
                    first: now,
                    last: now,
                };
                seen.insert(key.to_owned(), s);
                false
            }
        }
    }

    /// The holder of volume `id`'s lease when that is another node (a lease left by an earlier
    /// process of this node is not another node's).
    ///
    /// Errors: the lease cannot be read.
    pub(super) async fn held_elsewhere(
        &self,
        id: &VolumeId,
    ) -> Result<Option<Owner>, crate::cluster::lease::LeaseError> {
        Ok(self
            .leases
            .holder(id)
            .await?
            .map(|(owner, _)| owner)
            .filter(|owner| owner.node != self.me.node))
    }

    /// Forgets half-made entry `key` (released or deleted).
    pub(super) fn forget(&self, key: &str) {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, Held>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this process keeps `id`'s lease (it owns the volume).
    pub fn keeps(&self, id: &VolumeId) -> bool {
        self.kept().get(id).is_some_and(|h| !h.kept.is_lost())
    }

    /// The tenure of the lease this process keeps on `id`, if it keeps one (lost or not).
    pub fn tenure(&self, id: &VolumeId) -> Option<crate::cluster::lease::Tenure> {
        self.kept().get(id).map(|h| h.kept.tenure())
    }

    /// Whether this process keeps `id`'s lease for a mount.
    pub fn mounted_here(&self, id: &VolumeId) -> bool {
        self.kept()
            .get(id)
            .is_some_and(|h| h.mount && !h.kept.is_lost())
    }

    /// Drops this node's `purpose` hold on `id`'s lease (a mount ended, a snapshot is stored,
    /// a delete is done, or a claim's takeover failed); once nothing holds it, stops renewing
    /// it and releases it. A mount that ends while something else holds the lease takes its
    /// URI out of the lease first, so other nodes give none.
    pub(super) async fn release(&self, id: &VolumeId, purpose: Purpose) {
        self.release_claim(id, purpose, None).await;
    }

    /// The claim under which this process keeps `id`'s lease now, if it does.
    pub(super) fn claim_of(&self, id: &VolumeId) -> Option<u64> {
        self.kept().get(id).map(|h| h.claim)
    }

    /// [`ClusterMode::release`] of a hold taken under claim `claim` ([`ClusterMode::claim_of`]):
    /// nothing when the lease was lost and claimed again since (a task that outlived its claim,
    /// such as storing a snapshot, must not drop the next claim's holds).
    pub(super) async fn release_claim(&self, id: &VolumeId, purpose: Purpose, claim: Option<u64>) {
        let held = {
            let mut kept = self.kept();
            let Some(h) = kept
                .get_mut(id)
                .filter(|h| claim.is_none_or(|c| c == h.claim))
            else {
                return;
            };
            if h.drop_hold(purpose) {
                Err((purpose == Purpose::Mount).then(|| h.kept.advertise("")))
            } else {
                Ok(kept.remove(id))
            }
        };
        let held = match held {
            Ok(Some(held)) => held,
            Ok(None) | Err(None) => return,
            Err(Some(cleared)) => {
                if let Err(e) = cleared.await {
                    tracing::warn!(volume = %id, error = %e, "taking an ended mount's URI out of the lease failed");
                }
                return;
            }
        };
        if let Some(revision) = held.kept.stop().await {
            if let Err(e) = self.leases.release(id, revision).await {
                tracing::warn!(volume = %id, error = %e, "releasing the lease failed; it expires after the TTL");
            }
        }
    }

    /// Sends `payload` to node `node`'s copy of operation `op` (`vblock.NODE.OP`, with header
    /// `FORWARDED_HEADER`) and returns its reply body.
    ///
    /// Errors: `InternalError` when the node does not answer in time.
    pub(super) async fn forward(
        &self,
        node: &str,
        op: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        self.forward_within(node, op, payload, FORWARD_TIMEOUT)
            .await
    }

    /// [`ClusterMode::forward`], answered within `timeout`.
    pub(super) async fn forward_within(
        &self,
        node: &str,
        op: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ApiError> {
        self.forward_to(node, op, payload, timeout)
            .await
            .map_err(|e| {
                ApiError::internal(format!(
                    "forwarding to the owner node {node} (vblock.{node}.{op}) failed: {e}"
                ))
            })
    }

    /// [`ClusterMode::forward`], with NATS's error: `NoResponders` means no daemon of that
    /// name is serving.
    async fn forward_to(
        &self,
        node: &str,
        op: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, async_nats::RequestError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(super::handlers::FORWARDED_HEADER, self.me.node.as_str());
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::copy_from_slice(payload))
            .headers(headers)
            .timeout(Some(timeout));
        let msg = self
            .client
            .send_request(format!("vblock.{node}.{op}"), request)
            .await?;
        Ok(msg.payload.to_vec())
    }
}

/// Where a request about one volume is answered ([`Control::who_answers`]).
pub(super) enum Answer {
    /// By this node.
    Here,
    /// By node `.0`, which owns the volume (forward it on `vblock.NODE.OP`).
    Owner(String),
    /// By nobody now: why (answered as `VolumeInUse`).
    Refused(String),
}

/// What sending a request about one volume to its owner came to ([`Control::send_to_owner`]).
pub(super) enum AtOwner {
    /// The owner's reply.
    Reply(Vec<u8>),
    /// No daemon of the owner's name serves: this node took the volume over and holds its
    /// lease for [`Purpose::EndMount`]. The caller answers the request itself, as forwarded
    /// (so that a lease lost meanwhile is not chased), then drops that hold.
    TakenOver,
    /// No daemon of the owner's name serves and the volume could not be taken over: why
    /// (answered as `VolumeInUse`).
    InUse(String),
    /// The owner did not answer in time, or NATS failed.
    Unreachable(async_nats::RequestError),
}

/// What a cluster claim decided.
pub(super) enum Owned {
    /// This node owns the volume now.
    Here,
    /// Another node owns it (its mount URI is `nbd_advertise`; empty while it holds the
    /// volume for a snapshot or a delete, not a mount).
    There(Owner),
}

/// Key of ClientToken `token`'s claim in [`ClusterMode::abandoned`]'s table.
pub(super) fn claim_key(token: &str) -> String {
    format!("token/{token}")
}

/// Key of clone `id` left `creating` in [`ClusterMode::abandoned`]'s table.
pub(super) fn creating_key(id: &VolumeId) -> String {
    format!("creating/{id}")
}

/// A catalog error as an engine error: a lost compare-and-set is `IncorrectState` (try again).
pub(super) fn catalog_err(e: CatalogError) -> VolumeError {
    match e {
        CatalogError::Changed(_) => VolumeError::IncorrectState(e.to_string()),
        e => VolumeError::Internal(format!("catalog: {e}")),
    }
}

impl Control {
    /// Cluster mode, before a mount of `id` here that answers `uri`: makes this node the
    /// volume's owner or names the owner's URI. Unless this process already keeps the volume's
    /// lease, it claims the lease, keeps it at once (renewals run during the takeover), and
    /// takes the volume over in a new epoch: only a kept lease proves that nobody wrote the
    /// volume since this node did. On any failure the lease is released.
    /// `record`: the volume's catalog record (the takeover rebuilds it with this one). `uri`:
    /// empty when the claim is for a snapshot or a delete, not a mount. `Here` adds a
    /// `purpose` hold, which the caller drops with [`ClusterMode::release`].
    ///
    /// A mount on a lease this node keeps for something else (a snapshot) renews it at once
    /// with `uri`, so other nodes give it.
    ///
    /// Errors: [`VolumeError::IncorrectState`] (try again) for a mount while this node deletes
    /// the volume, or when the lease could not take the mount's URI; claim and takeover
    /// errors.
    pub(super) async fn cluster_own(
        &self,
        cluster: &ClusterMode,
        id: &VolumeId,
        uri: &str,
        record: VolumeRecord,
        purpose: Purpose,
    ) -> Result<Owned, VolumeError> {
        let kept_here = {
            let mut kept = cluster.kept();
            match kept.get_mut(id).filter(|h| !h.kept.is_lost()) {
                Some(h) if purpose == Purpose::Mount && h.delete => {
                    return Err(VolumeError::IncorrectState(format!(
                        "volume {id} is being deleted here"
                    )));
                }
                Some(h) => {
                    // Kept for a snapshot or an ended mount: the lease gets this mount's URI
                    // (the hold added first keeps the lease meanwhile).
                    let advertised =
                        (purpose == Purpose::Mount && !h.mount).then(|| h.kept.advertise(uri));
                    h.add(purpose);
                    Some(advertised)
                }
                None => None,
            }
        };
        if let Some(advertised) = kept_here {
            if let Some(advertised) = advertised {
                if let Err(e) = advertised.await {
                    cluster.release(id, purpose).await;
                    return Err(VolumeError::IncorrectState(format!(
                        "volume {id}: its lease could not take this mount's URI ({e}); try again"
                    )));
                }
            }
            return Ok(Owned::Here);
        }
        let mut me = cluster.me.clone();
        me.nbd_advertise = uri.to_owned();
        let (revision, sent) = match cluster.leases.claim(id, &me).await.map_err(lease_err)? {
            Claim::Won { revision, sent } => (revision, sent),
            Claim::Held(owner) => return Ok(Owned::There(owner)),
        };
        static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut held = Held {
            kept: cluster.leases.keep(id, &me, revision, sent),
            claim: CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            mount: false,
            snapshots: 0,
            delete: false,
            ending: 0,
        };
        held.add(purpose);
        cluster.kept().insert(id.clone(), held);
        // A delete goes on past damage (it removes the volume anyway); serving does not.
        let damage = match purpose {
            Purpose::Delete => OnDamage::KeepPrefix,
            _ => OnDamage::Refuse,
        };
        let taken = self
            .engine
            .take_over_with(id, &me.node, Some(record), damage)
            .await;
        let taken = match taken {
            Ok(epoch) => epoch,
            Err(e) => {
                cluster.release(id, purpose).await;
                return Err(e);
            }
        };
        if !cluster.keeps(id) {
            cluster.release(id, purpose).await;
            return Err(VolumeError::Internal(format!(
                "the lease of {id} was lost during its takeover; try again"
            )));
        }
        tracing::info!(volume = %id, epoch = taken, "this node owns the volume");
        Ok(Owned::Here)
    }

    /// Where an unmount or detach of volume `id` is answered: here (outside cluster mode, or
    /// when no other node holds its lease: a lease left by an earlier process of this node is
    /// not another node's), by the owner node (the request is forwarded to it), or nowhere
    /// (the lease cannot be read, or the request was forwarded here and this node does not own
    /// the volume: it is not forwarded again).
    pub(super) async fn who_answers(&self, id: &VolumeId, forwarded: bool) -> Answer {
        let Some(cluster) = self.cluster.clone() else {
            return Answer::Here;
        };
        if cluster.keeps(id) {
            return Answer::Here;
        }
        match cluster.held_elsewhere(id).await {
            Ok(Some(owner)) if forwarded => Answer::Refused(format!(
                "volume {id} is owned by node {}, not this one (the request was forwarded here); try again",
                owner.node
            )),
            Ok(Some(owner)) => Answer::Owner(owner.node),
            Ok(None) => Answer::Here,
            Err(e) => Answer::Refused(format!("cannot read the lease of {id}: {e}")),
        }
    }

    /// Cluster mode: sends `op` (an unmount or detach) of volume `id` to its owner `owner`
    /// (`vblock.OWNER.OP`). When no daemon of that name serves (it died), takes the volume over
    /// once its lease has expired, so that the request can end the mount here.
    pub(super) async fn send_to_owner(
        &self,
        cluster: &ClusterMode,
        owner: &str,
        id: &VolumeId,
        (op, payload): (&str, &[u8]),
    ) -> AtOwner {
        match cluster
            .forward_to(owner, op, payload, FORWARD_TIMEOUT)
            .await
        {
            Ok(reply) => AtOwner::Reply(reply),
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                match self.own_from_silent_owner(cluster, id, owner).await {
                    Ok(()) => AtOwner::TakenOver,
                    Err(why) => AtOwner::InUse(why),
                }
            }
            Err(e) => AtOwner::Unreachable(e),
        }
    }

    /// Takes volume `id` over from its owner when no daemon of the owner's name answers, once
    /// its lease has expired (claimed as a mount claims it: the TTL waited out on this node's
    /// clock; a takeover fences the old owner). Holds the lease for [`Purpose::EndMount`]; the
    /// caller drops that hold with [`ClusterMode::release`].
    ///
    /// Errors (why, answered as `VolumeInUse`): the owner still renews its lease; the record,
    /// claim or takeover failed.
    async fn own_from_silent_owner(
        &self,
        cluster: &ClusterMode,
        id: &VolumeId,
        owner: &str,
    ) -> Result<(), String> {
        let _g = self.lock.lock(id.as_str()).await;
        let (rec, _) = self.volume_at(id).await.map_err(|e| e.to_string())?;
        tracing::warn!(volume = %id, node = owner, "the owner node does not answer: taking the volume over once its lease expires, to end its mount here");
        match self
            .cluster_own(cluster, id, "", rec, Purpose::EndMount)
            .await
        {
            Ok(Owned::Here) => Ok(()),
            Ok(Owned::There(o)) if o.node == owner => Err(format!(
                "volume {id} is owned by node {owner}, which renews its lease but does not answer; try again"
            )),
            // Another node took it over first (a retry of this request that went elsewhere).
            Ok(Owned::There(o)) => Err(format!(
                "volume {id} is being taken over by node {}; try again",
                o.node
            )),
            Err(e) => Err(format!("volume {id}: {e}")),
        }
    }

    /// Cluster mode, at start: this process holds no lease, so no mount recorded here by an
    /// earlier process may be served: each is forgotten (its clients reconnect through a new
    /// mount, which claims the lease).
    /// The catalog's mounts through this node are an earlier process's too, and go as well.
    /// Runs before the control plane subscribes: no request changes a record meanwhile.
    pub(super) async fn forget_mounts(&self, cluster: &ClusterMode) -> Result<(), VolumeError> {
        for mut rec in self.engine.list_records().await? {
            if rec.mount.take().is_some() {
                tracing::info!(volume = %rec.volume_id, "cluster mode: forgetting a mount of an earlier process (no lease held)");
                self.engine.put_local_record(rec).await?;
            }
        }
        for rec in cluster.catalog.volumes().await.map_err(catalog_err)? {
            if rec
                .mount
                .as_ref()
                .is_some_and(|m| m.node == cluster.me.node)
            {
                self.forget_catalog_mount(cluster, &rec.volume_id).await;
            }
        }
        // Snapshot mounts need no lease: their exports survive the restart while the catalog
        // still records them through this node. One ended meanwhile (unmounted through
        // another node while this one was down) ends here too.
        self.end_unrecorded_snapshot_exports(cluster).await
    }

    /// Cluster mode: ends every snapshot export of this node that the catalog does not record
    /// through it: another node removed the mount from the catalog when this one did not
    /// answer (down, or off NATS for a moment). At start, and every `--lease-ttl` after
    /// ([`Control::watch_leases`]). Each snapshot is checked under its lock, which its mounts
    /// and unmounts through this node hold (a mount records itself here first, then in the
    /// catalog). A catalog that cannot be read keeps the export.
    ///
    /// Errors: metadata errors.
    async fn end_unrecorded_snapshot_exports(
        &self,
        cluster: &ClusterMode,
    ) -> Result<(), VolumeError> {
        for rec in self.engine.list_snapshots().await? {
            if rec.mount.is_none() {
                continue;
            }
            let id = &rec.snapshot_id;
            let _g = self.lock.lock(id.as_str()).await;
            let Some(m) = self.engine.get_snapshot(id).await?.and_then(|r| r.mount) else {
                continue;
            };
            let recorded = match cluster.catalog.snapshot(id).await {
                Ok(r) => r
                    .and_then(|(r, _)| r.mount)
                    .is_some_and(|c| c.node == m.node),
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "cannot check a snapshot mount in the catalog; keeping it");
                    continue;
                }
            };
            if !recorded {
                tracing::info!(snapshot = %id, "cluster mode: ending a snapshot mount the catalog no longer records");
                self.engine.unmount_snapshot(id, None).await?;
            }
        }
        Ok(())
    }

    /// Cluster mode, at start: an empty catalog (no volume, no snapshot) over a bucket that
    /// holds record copies was lost (the NATS server's store, with one KV replica) or is new
    /// on an old bucket: it is filled from the copies ([`Engine::stored_records`]: volumes
    /// unmounted, snapshots as stored; ClientTokens are not restored). Records another node
    /// adds meanwhile win. Runs before the control plane subscribes.
    ///
    /// Errors: catalog and backend errors (the start goes on; logged by the caller).
    pub(super) async fn fill_empty_catalog(
        &self,
        cluster: &ClusterMode,
    ) -> Result<(), VolumeError> {
        let catalog = &cluster.catalog;
        if !catalog.volumes().await.map_err(catalog_err)?.is_empty()
            || !catalog.snapshots().await.map_err(catalog_err)?.is_empty()
        {
            return Ok(());
        }
        let (volumes, snapshots) = self.engine.stored_records().await?;
        if volumes.is_empty() && snapshots.is_empty() {
            return Ok(());
        }
        tracing::warn!(volumes = volumes.len(), snapshots = snapshots.len(), "the catalog is empty but the bucket holds records: filling the catalog from the bucket's record copies");
        for mut rec in volumes {
            rec.mount = None;
            match catalog.put_volume(&rec, None).await {
                Ok(_) | Err(CatalogError::Changed(_)) => {}
                Err(e) => return Err(catalog_err(e)),
            }
        }
        for rec in snapshots {
            match catalog.put_snapshot(&rec, None).await {
                Ok(_) | Err(CatalogError::Changed(_)) => {}
                Err(e) => return Err(catalog_err(e)),
            }
        }
        Ok(())
    }

    /// Cluster mode: removes the catalog's mount of `id` if it is through this node (a mount
    /// that ended here without an unmount: a lost lease, a restart). Best effort: a failure is
    /// logged, and the next owner's mount replaces it anyway.
    pub(super) async fn forget_catalog_mount(&self, cluster: &ClusterMode, id: &VolumeId) {
        let result = async {
            let Some((mut rec, revision)) = cluster.catalog.volume(id).await? else {
                return Ok(());
            };
            if rec.mount.as_ref().is_some_and(|m| m.node == cluster.me.node) {
                rec.mount = None;
                cluster.catalog.put_volume(&rec, Some(revision)).await?;
                tracing::info!(volume = %id, "cluster mode: forgot this node's mount in the catalog");
            }
            Ok::<_, CatalogError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(volume = %id, error = %e, "forgetting this node's mount in the catalog failed");
        }
    }

    /// Cluster mode: closes every volume whose lease was lost (another node may own it now) at
    /// once, then forgets its mount here; every `--lease-ttl`, ends the snapshot exports the
    /// catalog no longer records ([`Control::end_unrecorded_snapshot_exports`]). Runs until
    /// the process ends.
    pub(super) async fn watch_leases(self: Arc<Self>, cluster: Arc<ClusterMode>) {
        let every = (cluster.leases.ttl() / 10).max(std::time::Duration::from_millis(50));
        let mut exports_checked = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            if exports_checked.elapsed() >= cluster.leases.ttl() {
                exports_checked = Instant::now();
                if let Err(e) = self.end_unrecorded_snapshot_exports(&cluster).await {
                    tracing::warn!(error = %e, "checking this node's snapshot exports against the catalog failed");
                }
            }
            let lost: Vec<VolumeId> = {
                let mut kept = cluster.kept();
                let lost: Vec<VolumeId> = kept
                    .iter()
                    .filter(|(_, h)| h.kept.is_lost())
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &lost {
                    kept.remove(id);
                }
                lost
            };
            for id in lost {
                metrics::counter!("vblock_leases_lost_total").increment(1);
                tracing::error!(volume = %id, "the volume's lease was lost: closing it here (another node may own it now)");
                // Closed at once, without the volume's control lock, which a mount may hold for a while.
                if let Err(e) = self.engine.close_volume_draining(&id, false).await {
                    tracing::warn!(volume = %id, error = %e, "closing a volume whose lease was lost failed");
                }
                let _g = self.lock.lock(id.as_str()).await;
                // A mount may have claimed the lease again meanwhile.
                if cluster.keeps(&id) {
                    continue;
                }
                if let Ok(Some(mut rec)) = self.engine.get_record(&id).await {
                    if let Err(e) = self.end_mount(&mut rec, false, None).await {
                        tracing::warn!(volume = %id, error = %e, "forgetting the mount of a volume whose lease was lost failed");
                    }
                }
                self.forget_catalog_mount(&cluster, &id).await;
            }
        }
    }
}

impl Control {
    /// Cluster mode's `ebs.createvolume` of `rec` (prepared by the handler), a clone of
    /// `snapshot` if given: the volume is created here (its record copy and, for a clone, its
    /// first map checkpoint in the bucket) and its record added to the catalog.
    ///
    /// A clone's record goes into the catalog (`creating`), then its pin on the snapshot into
    /// the bucket ([`Engine::pin_snapshot`]), before it shares the snapshot's chunks: a
    /// snapshot delete marks the snapshot deleted in the bucket before it lists the pins, so
    /// one of the two always sees the other, and the snapshot's map stays in the bucket for
    /// every node's garbage collection while the clone exists, whatever the catalog says.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`] when the snapshot went meanwhile; engine and
    /// catalog errors.
    pub(super) async fn cluster_create(
        &self,
        cluster: &ClusterMode,
        rec: &VolumeRecord,
        snapshot: Option<&SnapshotRecord>,
    ) -> Result<(), VolumeError> {
        let id = rec.volume_id.clone();
        let Some(s) = snapshot else {
            self.engine.create_volume_from(rec.clone()).await?;
            if let Err(e) = cluster.catalog.put_volume(rec, None).await {
                if let Err(e) = self.engine.delete_volume(&id).await {
                    tracing::warn!(volume = %id, error = %e, "removing a volume the catalog refused failed");
                }
                return Err(catalog_err(e));
            }
            return Ok(());
        };
        let creating = VolumeRecord {
            state: VolumeStateName::Creating,
            ..rec.clone()
        };
        let revision = cluster
            .catalog
            .put_volume(&creating, None)
            .await
            .map_err(catalog_err)?;
        let made = async {
            self.engine.pin_snapshot(&s.snapshot_id, &id).await?;
            if cluster
                .catalog
                .snapshot(&s.snapshot_id)
                .await
                .map_err(catalog_err)?
                .is_none()
            {
                return Err(VolumeError::SnapshotNotFound(s.snapshot_id.clone()));
            }
            self.engine.load_snapshot(&s.snapshot_id).await?;
            self.engine
                .create_volume_from_snapshot(rec.clone(), &s.snapshot_id)
                .await?;
            cluster
                .catalog
                .put_volume(rec, Some(revision))
                .await
                .map_err(catalog_err)
        }
        .await;
        if let Err(e) = &made {
            // A catalog write whose answer was lost may have landed: the clone is made then;
            // while that is unknown, its objects stay.
            match cluster.catalog.volume(&id).await {
                Ok(Some((r, _))) if r.state != VolumeStateName::Creating => return Ok(()),
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "cannot tell whether a failed clone was recorded; keeping its objects");
                    return made.map(|_| ());
                }
                _ => {}
            }
            tracing::warn!(volume = %id, snapshot = %s.snapshot_id, error = %e, "creating a clone failed");
            if let Err(e) = self.engine.purge_unfinished_volume(&id).await {
                // Its objects may still reference the snapshot's chunks: the record and the
                // pin stay, and the clone is deleted as abandoned later.
                tracing::warn!(volume = %id, error = %e, "removing a clone that failed failed; it stays `creating` until deleted as abandoned");
                return made.map(|_| ());
            }
            match cluster.catalog.delete_volume(&id, revision).await {
                Ok(()) => self.clone_gone(&id, s.snapshot_id.as_str()).await,
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "removing the catalog record of a clone that failed failed")
                }
            }
        }
        made.map(|_| ())
    }

    /// Cluster mode's delete of clone `rec` (read at `revision`), left `creating` for longer
    /// than `--abandon-after` ([`ClusterMode::abandoned`]: its node failed mid-create): its
    /// catalog record goes, then its objects in the bucket (nothing references them: it was
    /// never available) and its ClientToken.
    ///
    /// Errors: [`VolumeError::IncorrectState`] when the record changed meanwhile; catalog
    /// and backend errors.
    pub(super) async fn delete_abandoned_clone(
        &self,
        cluster: &ClusterMode,
        rec: &VolumeRecord,
        revision: u64,
    ) -> Result<(), VolumeError> {
        let id = &rec.volume_id;
        tracing::warn!(volume = %id, created = %rec.create_time, "deleting a clone its node never finished creating");
        cluster
            .catalog
            .delete_volume(id, revision)
            .await
            .map_err(catalog_err)?;
        cluster.forget(&creating_key(id));
        self.engine.purge_unfinished_volume(id).await?;
        self.clone_gone(id, &rec.snapshot_id).await;
        if !rec.client_token.is_empty() {
            cluster
                .catalog
                .release_token(&rec.client_token, id)
                .await
                .map_err(catalog_err)?;
        }
        Ok(())
    }

    /// Cluster mode: claims new volume `rec`'s ClientToken for it ([`Catalog::claim_token`]).
    /// `None`: claimed; create it. `Some(volume)`: an earlier request with the token created
    /// (or is creating) `volume`, the answer instead (`creating` until the catalog has it). A
    /// claim whose volume is not in the catalog and that has stayed so for `--abandon-after`
    /// ([`ClusterMode::abandoned`]: its node failed mid-create, or mid-delete) is released and
    /// the token claimed anew.
    ///
    /// Errors: `IdempotentParameterMismatch` when the earlier request asked for another size;
    /// catalog errors.
    pub(super) async fn claim_client_token(
        &self,
        cluster: &ClusterMode,
        rec: &VolumeRecord,
    ) -> Result<Option<VolumeRecord>, ApiError> {
        let key = claim_key(&rec.client_token);
        for _ in 0..2 {
            let Some((earlier, revision)) = cluster
                .catalog
                .claim_token(&rec.client_token, rec)
                .await
                .map_err(catalog_err)?
            else {
                return Ok(None);
            };
            if earlier.size_bytes != rec.size_bytes {
                return Err(ApiError::new(
                    "IdempotentParameterMismatch",
                    "ClientToken reused with different parameters",
                ));
            }
            if let Some((current, _)) = cluster
                .catalog
                .volume(&earlier.volume_id)
                .await
                .map_err(catalog_err)?
            {
                cluster.forget(&key);
                return Ok(Some(current));
            }
            if !cluster.abandoned(&key, revision, &earlier.create_time) {
                return Ok(Some(VolumeRecord {
                    state: VolumeStateName::Creating,
                    ..earlier
                }));
            }
            tracing::warn!(volume = %earlier.volume_id, created = %earlier.create_time, "a ClientToken's volume never reached the catalog; releasing the token");
            cluster
                .catalog
                .release_token(&rec.client_token, &earlier.volume_id)
                .await
                .map_err(catalog_err)?;
            cluster.forget(&key);
        }
        Err(ApiError::new(
            "IncorrectState",
            "requests with this ClientToken are racing; try again",
        ))
    }

    /// Cluster mode's `ebs.createsnapshot` of volume `id`: taken by the volume's owner, from
    /// its newest map. This node takes it when it owns the volume, or when nobody does (it
    /// claims the lease and takes the volume over for the snapshot, and releases the lease once
    /// the snapshot is stored in the bucket: until then only this node's garbage collection
    /// knows the snapshot's references). Otherwise the request goes to the owner
    /// (`vblock.NODE.createsnapshot`), unless it came from another node (`forwarded`).
    pub(super) async fn cluster_snapshot(
        &self,
        cluster: &Arc<ClusterMode>,
        id: &VolumeId,
        description: &str,
        payload: &[u8],
        forwarded: bool,
    ) -> Result<Vec<u8>, ApiError> {
        if forwarded && !cluster.keeps(id) {
            return Err(ApiError::new(
                "IncorrectState",
                format!(
                    "node {} does not own volume {id} any more; try again",
                    cluster.me.node
                ),
            ));
        }
        let vrec = {
            let g = self.lock.lock(id.as_str()).await;
            // Read under the lock: a delete through this node waits for it.
            let (vrec, _) = self.volume_at(id).await?;
            usable(&vrec)?;
            if let Owned::There(owner) = self
                .cluster_own(cluster, id, "", vrec.clone(), Purpose::Snapshot)
                .await?
            {
                drop(g);
                return cluster
                    .forward(&owner.node, "createsnapshot", payload)
                    .await;
            }
            vrec
        };
        // The hold just taken is this claim's: the task storing the snapshot drops it from
        // this claim only.
        let claim = cluster.claim_of(id);
        // This node holds the lease for the snapshot until it is stored in the bucket. The
        // catalog's record goes first (pending), then the snapshot is taken under its id: no
        // snapshot exists that the catalog cannot show or delete. A record this node leaves
        // behind (it died in between) has no copy in the bucket, and is settled `error` once
        // abandoned (Control::settle_in_catalog).
        let pending = SnapshotRecord {
            snapshot_id: SnapshotId::generate(),
            volume_id: id.clone(),
            volume_size_bytes: vrec.size_bytes,
            state: crate::records::SnapshotStateName::Pending,
            start_time: crate::engine::now_rfc3339(),
            progress: 0,
            description: description.to_owned(),
            seq: 0,
            mount: None,
        };
        let sid = pending.snapshot_id.clone();
        let revision = match cluster.catalog.put_snapshot(&pending, None).await {
            Ok(r) => r,
            Err(e) => {
                cluster.release_claim(id, Purpose::Snapshot, claim).await;
                return Err(catalog_err(e).into());
            }
        };
        let taken = self
            .engine
            .create_snapshot_as(id, sid.clone(), description)
            .await;
        if !cluster.mounted_here(id) {
            // The snapshot opened the volume; nobody mounted it.
            if let Err(e) = self.engine.close_volume(id).await {
                tracing::warn!(volume = %id, error = %e, "closing a volume after its snapshot failed");
            }
        }
        let (rec, stored) = match taken {
            Ok(t) => t,
            Err(e) => {
                if let Err(e) = cluster.catalog.delete_snapshot(&sid, revision).await {
                    tracing::warn!(snapshot = %sid, error = %e, "removing the catalog record of a snapshot not taken failed (it is settled `error` once abandoned)");
                }
                cluster.release_claim(id, Purpose::Snapshot, claim).await;
                return Err(e.into());
            }
        };
        if let Err(e) = cluster.catalog.put_snapshot(&rec, Some(revision)).await {
            // The state follows when the snapshot is stored (finish_snapshot, below).
            tracing::warn!(snapshot = %sid, error = %e, "recording the taken snapshot in the catalog failed");
        }
        let (cluster, vol) = (cluster.clone(), id.clone());
        tokio::spawn(async move {
            match stored.await {
                Ok(done) => {
                    if let Err(e) = cluster.catalog.finish_snapshot(&done).await {
                        tracing::error!(snapshot = %sid, error = %e, "updating the snapshot's catalog record failed");
                    }
                }
                Err(e) => {
                    tracing::error!(snapshot = %sid, error = %e, "storing the snapshot ended abnormally")
                }
            }
            cluster.release_claim(&vol, Purpose::Snapshot, claim).await;
        });
        Ok(body(&super::handlers::snapshot_to_api(&rec)))
    }

    /// Cluster mode's volume delete of `rec` (read from the catalog at `revision`, neither
    /// attached nor mounted): this node claims the volume's lease and takes it over (fencing
    /// any late writer; its chunk stats are then this node's), marks it `deleting` in the
    /// catalog, deletes it as a single daemon does (garbage collection spares chunks any
    /// snapshot or clone still uses), removes its catalog record and releases the lease.
    ///
    /// Errors: [`VolumeError::InUse`] when another node owns it; [`VolumeError::IncorrectState`]
    /// when its record changed meanwhile; engine and catalog errors (a retry finds it
    /// `deleting` and goes on).
    pub(super) async fn cluster_delete(
        &self,
        cluster: &ClusterMode,
        rec: VolumeRecord,
        revision: u64,
    ) -> Result<(), VolumeError> {
        let id = rec.volume_id.clone();
        if let Owned::There(owner) = self
            .cluster_own(cluster, &id, "", rec.clone(), Purpose::Delete)
            .await?
        {
            return Err(VolumeError::InUse(format!(
                "volume {id} is owned by node {}",
                owner.node
            )));
        }
        let deleted = async {
            let deleting = VolumeRecord {
                state: VolumeStateName::Deleting,
                ..rec
            };
            let revision = cluster
                .catalog
                .put_volume(&deleting, Some(revision))
                .await
                .map_err(catalog_err)?;
            self.engine.delete_volume(&id).await?;
            cluster
                .catalog
                .delete_volume(&id, revision)
                .await
                .map_err(catalog_err)?;
            if !deleting.client_token.is_empty() {
                if let Err(e) = cluster
                    .catalog
                    .release_token(&deleting.client_token, &id)
                    .await
                {
                    // Released later, as abandoned, by the next request with the token.
                    tracing::warn!(volume = %id, error = %e, "releasing the deleted volume's ClientToken failed");
                }
            }
            self.clone_gone(&id, &deleting.snapshot_id).await;
            Ok(())
        }
        .await;
        cluster.release(&id, Purpose::Delete).await;
        deleted
    }

    /// Cluster mode's `ebs.deletesnapshot`, through any node: the catalog record goes first,
    /// then (see [`Control::cluster_create`]) the record copy and map in the bucket unless a
    /// clone pins it (`SNAPID/clones/`), and this node's local copy.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`]; [`VolumeError::IncorrectState`] while
    /// pending; [`VolumeError::InUse`] while mounted here; engine and catalog errors.
    pub(super) async fn cluster_delete_snapshot(
        &self,
        cluster: &ClusterMode,
        id: &SnapshotId,
    ) -> Result<(), VolumeError> {
        let (rec, revision) = match self.snapshot_at(id).await {
            // An earlier delete removed the catalog record but not the bucket copies (a
            // backend error): a retry finishes it.
            Err(VolumeError::SnapshotNotFound(_)) => {
                let orphan = self
                    .engine
                    .stored_snapshot(id)
                    .await?
                    .is_some_and(|c| c.state != crate::records::SnapshotStateName::Pending);
                if orphan && self.delete_snapshot_copies_unless_cloned(id).await? {
                    tracing::info!(snapshot = %id, "finished the delete of a snapshot left in the bucket");
                    return Ok(());
                }
                return Err(VolumeError::SnapshotNotFound(id.clone()));
            }
            r => r?,
        };
        if rec.state == crate::records::SnapshotStateName::Pending {
            return Err(VolumeError::IncorrectState(format!(
                "snapshot {id} is pending; delete it once it completes"
            )));
        }
        if let Some(m) = &rec.mount {
            return Err(VolumeError::InUse(format!(
                "snapshot {id} is mounted through node {} (exported over NBD); unmount it first",
                m.node
            )));
        }
        if let Some(local) = self.engine.get_snapshot(id).await? {
            if local.mount.is_some() {
                return Err(VolumeError::InUse(format!(
                    "snapshot {id} is mounted (exported over NBD); unmount it first"
                )));
            }
        }
        cluster
            .catalog
            .delete_snapshot(id, revision)
            .await
            .map_err(catalog_err)?;
        self.delete_snapshot_copies_unless_cloned(id).await?;
        Ok(())
    }

    /// After clone `vol` of snapshot `snapshot_id` and its objects are gone (deleted, failed
    /// or abandoned; `""`: not a clone): its pin on the snapshot goes, and when a delete of the
    /// snapshot has begun, the snapshot's bucket copies too unless another clone still pins
    /// them. Best effort (logged): a pin left behind keeps the copies, and a deletesnapshot of
    /// the snapshot finishes it.
    async fn clone_gone(&self, vol: &VolumeId, snapshot_id: &str) {
        let Ok(sid) = SnapshotId::parse(snapshot_id) else {
            return;
        };
        if let Err(e) = self.engine.unpin_snapshot(&sid, vol).await {
            tracing::warn!(volume = %vol, snapshot = %sid, error = %e, "removing a gone clone's pin on its snapshot failed (the snapshot's copies stay in the bucket)");
            return;
        }
        if matches!(self.engine.snapshot_delete_begun(&sid).await, Ok(true)) {
            if let Err(e) = self.delete_snapshot_copies_unless_cloned(&sid).await {
                tracing::warn!(volume = %vol, snapshot = %sid, error = %e, "deleting a deleted snapshot's copies after its last clone failed (a deletesnapshot of it finishes it)");
            }
        }
    }

    /// Deletes snapshot `id`'s local copy, and its bucket copies unless a clone pins it
    /// ([`Engine::mark_snapshot_deleted`]: the copies hold the map that keeps the chunks a
    /// clone shares) or the catalog lists a clone of it (a second guard: clones made before
    /// pins existed have none). Returns whether the bucket copies went.
    ///
    /// Errors: engine, backend and catalog errors.
    ///
    /// A pin whose clone is gone (no catalog record, no record copy in the bucket: its node
    /// failed between removing the clone and its pin) is removed once this node has seen it
    /// so for `--abandon-after`; until then it keeps the copies.
    async fn delete_snapshot_copies_unless_cloned(
        &self,
        id: &SnapshotId,
    ) -> Result<bool, VolumeError> {
        let pins = self.engine.mark_snapshot_deleted(id).await?;
        let clones: std::collections::HashSet<String> = self
            .volume_records()
            .await?
            .into_iter()
            .filter(|v| v.snapshot_id == id.as_str())
            .map(|v| v.volume_id.to_string())
            .collect();
        let mut cloned = !clones.is_empty();
        for pin in pins.iter().filter(|p| !clones.contains(*p)) {
            let key = format!("pin/{id}/{pin}");
            let gone = match (VolumeId::parse(pin), &self.cluster) {
                (Ok(vol), Some(cluster))
                    if !self.engine.volume_copy_exists(&vol).await?
                        && cluster.abandoned(&key, 0, "") =>
                {
                    Some((vol, cluster))
                }
                _ => None,
            };
            let Some((vol, cluster)) = gone else {
                cloned = true;
                continue;
            };
            tracing::warn!(snapshot = %id, clone = %vol, "removing a pin whose clone is gone");
            self.engine.unpin_snapshot(id, &vol).await?;
            cluster.forget(&key);
        }
        self.engine.delete_snapshot_copies(id, !cloned).await?;
        Ok(!cloned)
    }
}

impl Control {
    /// Cluster mode: records snapshot `id`'s mount through this node in the catalog (`Some`),
    /// or removes this node's mount (`None`; a mount through another node is left alone).
    ///
    /// Errors: [`VolumeError::InUse`] when recording a mount while another node's is recorded
    /// (the caller ends its export); [`VolumeError::SnapshotNotFound`];
    /// [`VolumeError::IncorrectState`] when the record changed meanwhile; catalog errors.
    pub(super) async fn catalog_snapshot_mount(
        &self,
        cluster: &ClusterMode,
        id: &SnapshotId,
        mount: Option<&crate::records::Mount>,
    ) -> Result<(), VolumeError> {
        let (mut rec, revision) = self.snapshot_at(id).await?;
        if let Some(m) = rec.mount.as_ref().filter(|m| m.node != cluster.me.node) {
            return match mount {
                Some(_) => Err(VolumeError::InUse(format!(
                    "snapshot {id} is mounted through node {}",
                    m.node
                ))),
                None => Ok(()),
            };
        }
        if rec.mount.as_ref() == mount {
            return Ok(());
        }
        rec.mount = mount.cloned();
        put_snapshot_at(cluster, &rec, revision).await
    }

    /// Cluster mode's unmount of snapshot `id` (`node`: only if mounted through it): refused
    /// while the catalog has it mounted through another node; ends this node's export (if it
    /// has one) and the catalog's mount.
    ///
    /// Errors: [`VolumeError::SnapshotNotFound`], [`VolumeError::InUse`]; engine and catalog
    /// errors.
    pub(super) async fn cluster_unmount_snapshot(
        &self,
        cluster: &ClusterMode,
        id: &SnapshotId,
        node: Option<&str>,
        request: (&[u8], bool),
    ) -> Result<(), VolumeError> {
        let _g = self.lock.lock(id.as_str()).await;
        let (rec, revision) = self.snapshot_at(id).await?;
        if let Some(m) = rec.mount.as_ref().filter(|m| m.node != cluster.me.node) {
            let (payload, forwarded) = request;
            if forwarded || node.is_some_and(|n| n != m.node) {
                return Err(VolumeError::InUse(format!(
                    "snapshot {id} is mounted through node {}",
                    m.node
                )));
            }
            return self
                .unmount_snapshot_elsewhere(cluster, (rec, revision), payload)
                .await;
        }
        if self.engine.get_snapshot(id).await?.is_some()
            && self.engine.unmount_snapshot(id, node).await?
        {
            tracing::info!(snapshot = %id, "snapshot unmounted");
        }
        self.catalog_snapshot_mount(cluster, id, None).await
    }
}

impl Control {
    /// Unmount of snapshot `rec` (read at `revision`), mounted through another node: forwarded
    /// to that node (`vblock.NODE.unmount`), which ends its export and the catalog's mount. When
    /// no daemon of that name serves (it is down, or gone for good), the catalog's mount is
    /// removed here; should that node come back, it ends its export at its start (see
    /// [`Control::forget_mounts`]).
    ///
    /// Errors: the node's refusal ([`VolumeError::InUse`] or as it said);
    /// [`VolumeError::IncorrectState`] when the record changed meanwhile; catalog errors.
    async fn unmount_snapshot_elsewhere(
        &self,
        cluster: &ClusterMode,
        (mut rec, revision): (SnapshotRecord, u64),
        payload: &[u8],
    ) -> Result<(), VolumeError> {
        let id = rec.snapshot_id.clone();
        let node = rec
            .mount
            .as_ref()
            .map(|m| m.node.clone())
            .unwrap_or_default();
        match cluster
            .forward_to(&node, "unmount", payload, FORWARD_TIMEOUT)
            .await
        {
            Ok(reply) => {
                let r: super::api::EbsUnmountResponse =
                    serde_json::from_slice(&reply).map_err(|e| {
                        VolumeError::Internal(format!("node {node}'s unmount reply: {e}"))
                    })?;
                match r.error.as_str() {
                    "" => Ok(()),
                    _ if r.not_found => Err(VolumeError::SnapshotNotFound(id)),
                    e => Err(VolumeError::InUse(format!("node {node}: {e}"))),
                }
            }
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                tracing::warn!(snapshot = %id, %node, "the node a snapshot is mounted through does not answer; removing its mount from the catalog");
                rec.mount = None;
                put_snapshot_at(cluster, &rec, revision).await
            }
            Err(e) => Err(VolumeError::Internal(format!(
                "forwarding the unmount of {id} to node {node} failed: {e}"
            ))),
        }
    }
}

/// Stores snapshot record `rec` in the catalog over the one read at `revision`.
///
/// Errors: [`VolumeError::IncorrectState`] when it changed meanwhile; catalog errors.
async fn put_snapshot_at(
    cluster: &ClusterMode,
    rec: &SnapshotRecord,
    revision: u64,
) -> Result<(), VolumeError> {
    cluster
        .catalog
        .put_snapshot(rec, Some(revision))
        .await
        .map_err(catalog_err)?;
    Ok(())
}

fn lease_err(e: crate::cluster::lease::LeaseError) -> VolumeError {
    VolumeError::Internal(format!("volume lease: {e}"))
}
