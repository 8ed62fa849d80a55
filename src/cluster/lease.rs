//! Volume leases in a JetStream KV bucket (docs/design/cluster.md, "Lease"): which node should
//! own a volume. A lease is the key `owner.VOLUMEID` holding an [`Owner`]; holding it means
//! renewing it (a compare-and-set on its revision) more often than the TTL. nats-server 2.9 has
//! no per-key TTL, so expiry is judged by the candidate: a revision that has not changed for the
//! TTL on the candidate's own monotonic clock. No clocks are compared between nodes.
//!
//! A lease says who *should* write; it does not make a stale owner harmless (JetStream can lose
//! acknowledged writes under faults). That is the S3 fence's job (`Backend::put_if_absent`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation, Store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::VolumeId;

/// The holder of a volume's lease (the value of `owner.VOLUMEID`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Node name (`--node`).
    pub node: String,
    /// Random per daemon process: a restarted daemon, or a second one misconfigured with the
    /// same node name, is another holder and waits out the TTL like any claimer.
    pub instance: String,
    /// The volume's epoch under this owner (docs/design/cluster.md, "Fence").
    pub epoch: u64,
    /// `host:port` its NBD clients connect to (`--nbd-advertise`).
    pub nbd_advertise: String,
}

impl Owner {
    /// The holder `node` as this daemon process (a fresh random instance).
    pub fn new(node: &str, epoch: u64, nbd_advertise: &str) -> Self {
        use rand::Rng;
        Self {
            node: node.to_owned(),
            instance: format!("{:016x}", rand::thread_rng().gen::<u64>()),
            epoch,
            nbd_advertise: nbd_advertise.to_owned(),
        }
    }

    /// Whether `other` is the same holder (node and process).
    pub fn same_holder(&self, other: &Owner) -> bool {
        self.node == other.node && self.instance == other.instance
    }
}

/// The outcome of [`Leases::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds the lease; renew it with this revision.
    Won {
        /// The key's revision after the claim.
        revision: u64,
        /// When the winning write was sent: the lease runs from here, on this node's clock.
        sent: Instant,
    },
    /// Another node holds the lease and renewed it within the TTL (or just won it).
    Held(Owner),
}

/// Errors of the lease layer.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another node changed the lease since this node last wrote it: it is not ours any more.
    #[error("the lease of {0} was taken by another node")]
    Lost(VolumeId),
    /// The KV bucket could not be reached or answered with an error.
    #[error("JetStream KV: {0}")]
    Kv(String),
    /// The lease's value does not decode.
    #[error("the lease of {id} is corrupt: {reason}")]
    Corrupt {
        /// Volume.
        id: VolumeId,
        /// Why.
        reason: String,
    },
}

fn kv_err(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Kv(e.to_string())
}

/// The leases of a cluster: one KV bucket, one TTL.
pub struct Leases {
    kv: Store,
    ttl: Duration,
}

impl Leases {
    /// The leases in KV bucket `bucket` (created, with one value per key and `replicas`
    /// copies, if missing) with lease time `ttl`.
    ///
    /// Errors: [`LeaseError::Kv`] when JetStream is off or unreachable, or cannot keep
    /// `replicas` copies.
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self, LeaseError> {
        let kv = super::open_bucket(client, bucket, replicas)
            .await
            .map_err(kv_err)?;
        Ok(Self { kv, ttl })
    }

    /// The lease's time: a holder that has not renewed for this long may be replaced.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn key(id: &VolumeId) -> String {
        format!("owner.{id}")
    }

    /// The current holder of volume `id`'s lease and the key's revision, if it is held.
    pub async fn holder(&self, id: &VolumeId) -> Result<Option<(Owner, u64)>, LeaseError> {
        match self.kv.entry(Self::key(id)).await.map_err(kv_err)? {
            Some(e) if e.operation == Operation::Put => {
                let owner =
                    serde_json::from_slice(&e.value).map_err(|err| LeaseError::Corrupt {
                        id: id.clone(),
                        reason: err.to_string(),
                    })?;
                Ok(Some((owner, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Claims volume `id`'s lease for `me`. A free lease (never held, or released) is taken at
    /// once, and so is one `me` holds already (the same node and process). A lease another
    /// holder has is watched for at most the TTL: if its revision changes (a renewal, or another
    /// claimer winning) it is [`Claim::Held`] by that node; if it does not, the holder is taken
    /// to be gone and the lease is taken over by a compare-and-set on the revision seen. Of
    /// racing claimers exactly one wins; the others get [`Claim::Held`] with the winner.
    ///
    /// Takes up to the TTL (plus a poll interval) when the holder is gone, and up to the
    /// holder's renewal interval when it is alive.
    ///
    /// Errors: [`LeaseError::Kv`], [`LeaseError::Corrupt`].
    pub async fn claim(&self, id: &VolumeId, me: &Owner) -> Result<Claim, LeaseError> {
        let key = Self::key(id);
        let body = Bytes::from(serde_json::to_vec(me).map_err(kv_err)?);
        // After a lost compare-and-set the winner has just written: no need to watch it.
        let mut fresh = false;
        loop {
            let sent = Instant::now();
            let (owner, revision) = match self.holder(id).await? {
                None => match self.kv.create(&key, body.clone()).await {
                    Ok(revision) => return Ok(Claim::Won { revision, sent }),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        fresh = true;
                        continue;
                    }
                    Err(e) => return Err(kv_err(e)),
                },
                Some(held) => held,
            };
            if !owner.same_holder(me) {
                if fresh {
                    return Ok(Claim::Held(owner));
                }
                tracing::info!(volume = %id, holder = %owner.node, "watching a held lease: it is claimed once it has not changed for the TTL");
                if let Some(now) = self.watch(id, revision).await? {
                    match now {
                        Some((owner, _)) => return Ok(Claim::Held(owner)),
                        // Released meanwhile: claim it afresh.
                        None => continue,
                    }
                }
            }
            let sent = Instant::now();
            match self.kv.update(&key, body.clone(), revision).await {
                Ok(revision) => return Ok(Claim::Won { revision, sent }),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => fresh = true,
                Err(e) => return Err(kv_err(e)),
            }
        }
    }

    /// Watches volume `id`'s lease, seen at `revision`, for the TTL on this node's clock:
    /// `Some(now)` as soon as the revision changes (`now`: the new holder, or `None` once
    /// released); `None` when it stayed the same for the whole TTL.
    async fn watch(
        &self,
        id: &VolumeId,
        revision: u64,
    ) -> Result<Option<Option<(Owner, u64)>>, LeaseError> {
        let since = Instant::now();
        let poll = (self.ttl / 10).max(Duration::from_millis(10));
        loop {
            let now = self.holder(id).await?;
            if now.as_ref().map(|(_, r)| *r) != Some(revision) {
                return Ok(Some(now));
            }
            let left = self.ttl.saturating_sub(since.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(poll.min(left)).await;
        }
    }

    /// Renews volume `id`'s lease, held by `me` at `revision`; returns the new revision.
    ///
    /// Errors: [`LeaseError::Lost`] when another node changed it since (the caller must stop
    /// writing the volume); [`LeaseError::Kv`].
    pub async fn renew(&self, id: &VolumeId, me: &Owner, revision: u64) -> Result<u64, LeaseError> {
        let body = Bytes::from(serde_json::to_vec(me).map_err(kv_err)?);
        match self.kv.update(Self::key(id), body, revision).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(LeaseError::Lost(id.clone()))
            }
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Releases volume `id`'s lease, held at `revision` (an unmount): the next claim takes it at
    /// once.
    ///
    /// Errors: [`LeaseError::Lost`] when another node holds it now (left alone); [`LeaseError::Kv`].
    pub async fn release(&self, id: &VolumeId, revision: u64) -> Result<(), LeaseError> {
        match self
            .kv
            .delete_expect_revision(Self::key(id), Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
                Err(LeaseError::Lost(id.clone()))
            }
            Err(e) => Err(kv_err(e)),
        }
    }
}

/// A lease kept by a task that renews it every TTL/3 ([`Leases::keep`]); dropping it stops the
/// renewals (the lease then expires, or is released by its owner first).
pub struct Kept {
    tenure: Tenure,
    stop: Arc<tokio::sync::Notify>,
    /// Asks the renewal task to renew at once with another `nbd_advertise`
    /// ([`Kept::advertise`]).
    advertise: tokio::sync::mpsc::Sender<Advertise>,
    /// Ends with the last revision written, or `None` once the lease was lost.
    task: tokio::task::JoinHandle<Option<u64>>,
}

/// Whether a kept lease still holds ([`Kept::tenure`]): what a volume asks before it serves
/// I/O. Cheap to clone and to ask (one atomic read of the lost flag, one uncontended lock).
#[derive(Clone)]
pub struct Tenure {
    lost: tokio::sync::watch::Receiver<bool>,
    /// Until when the lease can be trusted: 2/3 of the TTL after the last successful renewal
    /// was *sent* (a claimer's clock starts no earlier than that).
    trusted_until: Arc<std::sync::Mutex<Instant>>,
}

impl Tenure {
    /// A tenure trusted until `deadline` and never renewed: a lease kept by other means (an
    /// engine driven without a control plane, as in tests).
    pub fn until(deadline: Instant) -> Self {
        let (_, lost) = tokio::sync::watch::channel(false);
        Self {
            lost,
            trusted_until: Arc::new(std::sync::Mutex::new(deadline)),
        }
    }

    /// True once the lease is lost: another node changed it, or no renewal sent in the last two
    /// thirds of the TTL has succeeded (after the TTL a claimer may take it over). Judged at the
    /// call, not only by the renewal task, which may not have run yet after a pause. A lost
    /// lease stays lost: its owner stops serving the volume and claims it again if it still
    /// should.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || Instant::now() >= *trusted(&self.trusted_until)
    }
}

impl Kept {
    /// [`Tenure::is_lost`] of this lease.
    pub fn is_lost(&self) -> bool {
        self.tenure.is_lost()
    }

    /// A handle on this lease's validity for the volume it guards; it stays valid after the
    /// `Kept` is dropped (and reports the lease lost once its trusted time has passed).
    pub fn tenure(&self) -> Tenure {
        self.tenure.clone()
    }

    /// Resolves once the lease is lost ([`Kept::is_lost`]).
    pub async fn lost(&self) {
        let mut rx = self.tenure.lost.clone();
        loop {
            if self.is_lost() {
                return;
            }
            let until = *trusted(&self.tenure.trusted_until);
            tokio::select! {
                _ = rx.wait_for(|lost| *lost) => return,
                () = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    /// Renews the lease at once with `nbd_advertise` as the holder's NBD address (empty: no
    /// mount here, so other nodes give no URI), and keeps renewing it so. The future holds no
    /// borrow of the `Kept`.
    ///
    /// Errors: [`LeaseError::Lost`] when the lease is lost (or its renewals ended);
    /// [`LeaseError::Kv`] when the renewal failed (the lease is still kept; the next renewal,
    /// soon after a failure, writes the new address).
    pub fn advertise(
        &self,
        nbd_advertise: &str,
    ) -> impl std::future::Future<Output = Result<(), LeaseError>> + Send + 'static {
        let (sender, nbd_advertise) = (self.advertise.clone(), nbd_advertise.to_owned());
        async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let asked = Advertise {
                nbd_advertise,
                reply,
            };
            let ended = || LeaseError::Kv("the lease's renewals have ended".into());
            sender.send(asked).await.map_err(|_| ended())?;
            answer.await.map_err(|_| ended())?
        }
    }

    /// Stops renewing (after a renewal in flight, if any) and returns the revision last
    /// written, for [`Leases::release`]; `None` if the lease was lost.
    pub async fn stop(mut self) -> Option<u64> {
        self.stop.notify_one();
        let last = (&mut self.task).await.ok().flatten();
        // Stopping marks the tenure lost: whether the lease still held is a matter of time.
        last.filter(|_| Instant::now() < *trusted(&self.tenure.trusted_until))
    }
}

/// A request to [`Kept`]'s renewal task: renew now with this address, and say how it went.
struct Advertise {
    nbd_advertise: String,
    reply: tokio::sync::oneshot::Sender<Result<(), LeaseError>>,
}

fn trusted(m: &std::sync::Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `vblock_leases_kept`, counted up while one lease's renewal task lives.
struct KeptGauge(metrics::Gauge);

impl KeptGauge {
    fn new() -> Self {
        let g = metrics::gauge!("vblock_leases_kept");
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for KeptGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leases {
    /// Keeps volume `id`'s lease, won by `me` at `revision` with a write sent at `sent`
    /// ([`Claim::Won`]): renews it every TTL/3 until the returned [`Kept`] is dropped or the
    /// lease is lost.
    pub fn keep(self: &Arc<Self>, id: &VolumeId, me: &Owner, revision: u64, sent: Instant) -> Kept {
        let (tx, lost) = tokio::sync::watch::channel(false);
        let give_up = self.ttl * 2 / 3;
        let trusted_until = Arc::new(std::sync::Mutex::new(sent + give_up));
        let stop = Arc::new(tokio::sync::Notify::new());
        let (advertise, mut asked) = tokio::sync::mpsc::channel::<Advertise>(1);
        let (leases, id, until) = (self.clone(), id.clone(), trusted_until.clone());
        let mut me = me.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let every = leases.ttl / 3;
            let mut revision = revision;
            let mut renewed = sent;
            // Counted while this task lives (also when aborted: the guard is dropped then).
            let _kept = KeptGauge::new();
            let renewals = |result: &'static str| {
                metrics::counter!("vblock_lease_renewals_total", "result" => result).increment(1)
            };
            let mut next = tokio::time::Instant::now() + every;
            loop {
                let mut reply = None;
                let mut holder = me.clone();
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = stopped.notified() => {
                        // Released next: a volume it guards serves nothing from now on.
                        tx.send_replace(true);
                        return Some(revision);
                    }
                    Some(a) = asked.recv() => {
                        // Kept whatever this renewal does: the next one writes it too.
                        me.nbd_advertise = a.nbd_advertise;
                        holder = me.clone();
                        reply = Some(a.reply);
                    }
                }
                // A renewal may not outlast the time the lease can still be trusted (a NATS
                // request waits for a reconnect otherwise).
                let left = give_up.saturating_sub(renewed.elapsed());
                let sending = Instant::now();
                let renewal = tokio::time::timeout(left, async {
                    match leases.renew(&id, &holder, revision).await {
                        // An earlier renewal whose answer was lost may have landed: the key
                        // then holds this holder at a newer revision, which is taken up.
                        Err(LeaseError::Lost(lost)) => match leases.holder(&id).await {
                            Ok(Some((o, r))) if o.same_holder(&holder) && r > revision => {
                                revision = r;
                                Err(LeaseError::Kv(
                                    "an earlier renewal had landed; renewing at its revision"
                                        .into(),
                                ))
                            }
                            _ => Err(LeaseError::Lost(lost)),
                        },
                        other => other,
                    }
                })
                .await
                .unwrap_or_else(|_| Err(LeaseError::Kv("renewal timed out".into())));
                let answer = match renewal {
                    Ok(r) => {
                        renewals("ok");
                        revision = r;
                        renewed = sending;
                        *trusted(&until) = sending + give_up;
                        next = tokio::time::Instant::now() + every;
                        Ok(())
                    }
                    Err(LeaseError::Lost(_)) => {
                        renewals("lost");
                        tracing::error!(volume = %id, "lease taken by another node");
                        tx.send_replace(true);
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(LeaseError::Lost(id.clone())));
                        }
                        break;
                    }
                    Err(e) => {
                        renewals("failed");
                        tracing::warn!(volume = %id, error = %e, "lease renewal failed; retrying");
                        if renewed.elapsed() >= give_up {
                            tracing::error!(volume = %id, "lease not renewed for 2/3 of its time: given up");
                            tx.send_replace(true);
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(LeaseError::Lost(id.clone())));
                            }
                            break;
                        }
                        // Tried again soon: the lease can be trusted for 2/3 of the TTL after
                        // the last renewal, and one failure must not use that up.
                        next = tokio::time::Instant::now() + every / 4;
                        Err(e)
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            tx.send_replace(true);
            None
        });
        Kept {
            tenure: Tenure {
                lost,
                trusted_until,
            },
            stop,
            advertise,
            task,
        }
    }
}
