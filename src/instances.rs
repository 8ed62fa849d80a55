//! The one live instance of each open volume. A volume's instance goes opening → open → closing
//! → closed, and there is never a second one: an opener finds the open instance, waits while it
//! is opening or closing and then looks again, or starts the open itself. A WAL directory, a map
//! and a range of chunk object ids so belong to one instance at a time; the WAL's lock file
//! ([`crate::wal::WalError::Locked`]) backs this up, also against a second process on the same
//! directory.
//!
//! Opens run in their own task and closes finish their bookkeeping even when the caller goes
//! away (a handshake timeout, a panic), so no slot is ever left behind: a waiter that finds the
//! slot's owner gone treats the slot as stale and removes it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::ids::VolumeId;
use crate::volume::{Volume, VolumeError};

/// A volume's entry in the table.
enum Slot {
    /// Open: every caller shares this instance.
    Open(Volume),
    /// Being opened by a task, or closing (and, for a delete or resize, what follows the close):
    /// others wait until the owner drops the sender.
    Busy(watch::Receiver<()>),
}

type Slots = Arc<Mutex<HashMap<VolumeId, Slot>>>;

/// The table of open volumes of an engine.
#[derive(Default)]
pub(crate) struct Instances {
    slots: Slots,
}

/// Waits until the owner of a busy slot whose receiver is `rx` is done, at most until
/// `deadline`; then, if the slot still holds the same (now closed) channel, its owner went
/// away without cleaning up: the slot is removed.
async fn wait_busy(
    slots: &Slots,
    id: &VolumeId,
    mut rx: watch::Receiver<()>,
    deadline: Instant,
) -> Result<(), VolumeError> {
    // The sender is dropped when the owner is done: `changed` then returns an error.
    if tokio::time::timeout_at(deadline, rx.changed())
        .await
        .is_err()
    {
        return Err(VolumeError::IncorrectState(format!(
            "volume {id} is still being opened or closed"
        )));
    }
    let mut slots = slots.lock().await;
    if let Some(Slot::Busy(now)) = slots.get(id) {
        if now.same_channel(&rx) {
            slots.remove(id);
        }
    }
    Ok(())
}

impl Instances {
    /// The open instance of `id`, or the one `open` makes when there is none. The open runs in
    /// its own task (it finishes and is recorded even if this caller goes away); meanwhile other
    /// openers wait for it, as they wait while `id` is closing — at most `wait` in all.
    ///
    /// Errors: `open`'s; [`VolumeError::IncorrectState`] when an open or close outlasts `wait`;
    /// [`VolumeError::Internal`] when the open task panics.
    pub(crate) async fn get_or_open<Fut>(
        &self,
        id: &VolumeId,
        wait: Duration,
        open: Fut,
    ) -> Result<Volume, VolumeError>
    where
        Fut: Future<Output = Result<Volume, VolumeError>> + Send + 'static,
    {
        let deadline = Instant::now() + wait;
        let (tx, rx) = watch::channel(());
        loop {
            let mut slots = self.slots.lock().await;
            let busy = match slots.get(id) {
                Some(Slot::Open(v)) => return Ok(v.clone()),
                Some(Slot::Busy(rx)) => rx.clone(),
                None => {
                    slots.insert(id.clone(), Slot::Busy(rx));
                    break;
                }
            };
            drop(slots);
            wait_busy(&self.slots, id, busy, deadline).await?;
        }
        let (slots, vid) = (self.slots.clone(), id.clone());
        let task = tokio::spawn(async move {
            let opened = open.await;
            let mut slots = slots.lock().await;
            match &opened {
                Ok(v) => slots.insert(vid, Slot::Open(v.clone())),
                Err(_) => slots.remove(&vid),
            };
            drop(slots);
            drop(tx);
            opened
        });
        task.await
            .map_err(|e| VolumeError::task("volume open", e))?
    }

    /// Closes `id`'s instance, if open, with `close`, then — if the close succeeded — runs
    /// `then` (e.g. deleting the volume's files), with openers waiting throughout; an open or
    /// another close in progress is waited for first (at most `wait`). Should this call be
    /// dropped half way (its caller cancelled, a panic), the slot is freed all the same.
    ///
    /// Errors: `close`'s (then `then` does not run) and `then`'s;
    /// [`VolumeError::IncorrectState`] when another open or close outlasts `wait`.
    pub(crate) async fn close_then<C, CFut, T, TFut>(
        &self,
        id: &VolumeId,
        wait: Duration,
        close: C,
        then: T,
    ) -> Result<(), VolumeError>
    where
        C: FnOnce(Volume) -> CFut,
        CFut: Future<Output = Result<(), VolumeError>>,
        T: FnOnce() -> TFut,
        TFut: Future<Output = Result<(), VolumeError>>,
    {
        let deadline = Instant::now() + wait;
        let (tx, rx) = watch::channel(());
        let open = loop {
            let mut slots = self.slots.lock().await;
            let busy = match slots.get(id) {
                Some(Slot::Busy(other)) => other.clone(),
                // Open or absent: the slot is this close's now.
                _ => match slots.insert(id.clone(), Slot::Busy(rx)) {
                    Some(Slot::Open(v)) => break Some(v),
                    _ => break None,
                },
            };
            drop(slots);
            wait_busy(&self.slots, id, busy, deadline).await?;
        };
        let guard = Release {
            slots: self.slots.clone(),
            id: id.clone(),
            tx: Some(tx),
        };
        if let Some(v) = open {
            close(v).await?;
        }
        let then = then().await;
        drop(guard);
        then
    }

    /// Takes every open instance out of the table (crash simulation); busy ones are left.
    pub(crate) async fn take_all(&self) -> Vec<Volume> {
        let mut slots = self.slots.lock().await;
        let ids: Vec<VolumeId> = slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Open(_)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| match slots.remove(&id) {
                Some(Slot::Open(v)) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// The ids of the volumes open, opening or closing now.
    pub(crate) async fn ids(&self) -> Vec<VolumeId> {
        self.slots.lock().await.keys().cloned().collect()
    }

    /// The open instances (metrics).
    pub(crate) async fn open(&self) -> Vec<Volume> {
        let slots = self.slots.lock().await;
        open_volumes(&slots).cloned().collect()
    }

    /// [`Instances::open`] without waiting: `None` while the table is locked.
    pub(crate) fn try_open(&self) -> Option<Vec<Volume>> {
        let slots = self.slots.try_lock().ok()?;
        Some(open_volumes(&slots).cloned().collect())
    }
}

/// Frees a closing volume's slot when dropped — after the close and its follow-up, or when the
/// closer goes away half way — and then lets its waiters go (drops the sender).
struct Release {
    slots: Slots,
    id: VolumeId,
    tx: Option<watch::Sender<()>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (slots, id, tx) = (self.slots.clone(), self.id.clone(), self.tx.take());
        // Removing needs the table's async lock: at once when it is free (the usual case),
        // else from a task.
        let remove = move |slots: &mut HashMap<VolumeId, Slot>| {
            if let (Some(Slot::Busy(rx)), Some(tx)) = (slots.get(&id), &tx) {
                if rx.same_channel(&tx.subscribe()) {
                    slots.remove(&id);
                }
            }
            drop(tx);
        };
        if let Ok(mut guard) = self.slots.try_lock() {
            remove(&mut guard);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { remove(&mut *slots.lock().await) });
        }
        // Without a runtime the sender goes with `remove`: waiters then find the slot's
        // channel closed and remove the slot themselves.
    }
}

/// The open instances in `slots`.
fn open_volumes(slots: &HashMap<VolumeId, Slot>) -> impl Iterator<Item = &Volume> {
    slots.values().filter_map(|s| match s {
        Slot::Open(v) => Some(v),
        Slot::Busy(_) => None,
    })
}
