//! The one live instance of each open volume. A volume's instance goes opening → open → closing
//! → closed, and there is never a second one: an opener finds the open instance, opens it
//! itself while holding the table (so concurrent openers wait for it), or, while the volume is
//! closing, waits until the close is done and looks again. A WAL directory, a map and a range
//! of chunk object ids so belong to one instance at a time; the WAL's lock file
//! ([`crate::wal::WalError::Locked`]) catches a second process on the same directory.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{watch, Mutex};

use crate::ids::VolumeId;
use crate::volume::{Volume, VolumeError};

/// A volume's entry in the table.
enum Slot {
    /// Open: every caller shares this instance.
    Open(Volume),
    /// Closing (and, for a delete or resize, what follows the close): openers wait until the
    /// sender is dropped.
    Closing(watch::Receiver<()>),
}

/// The table of open volumes of an engine.
#[derive(Default)]
pub(crate) struct Instances {
    slots: Mutex<HashMap<VolumeId, Slot>>,
}

impl Instances {
    /// The open instance of `id`, or the one `open` makes when there is none (the table stays
    /// locked meanwhile, so no other opener makes another). While `id` is closing, waits up to
    /// `wait` for the close to end, then looks again.
    ///
    /// Errors: `open`'s; [`VolumeError::IncorrectState`] when the close outlasts `wait`.
    pub(crate) async fn get_or_open<F, Fut>(
        &self,
        id: &VolumeId,
        wait: Duration,
        open: F,
    ) -> Result<Volume, VolumeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Volume, VolumeError>>,
    {
        let mut slots = loop {
            let slots = self.slots.lock().await;
            let mut closing = match slots.get(id) {
                Some(Slot::Open(v)) => return Ok(v.clone()),
                Some(Slot::Closing(rx)) => rx.clone(),
                None => break slots,
            };
            drop(slots);
            // The sender is dropped when the close is over: `changed` then returns an error.
            if tokio::time::timeout(wait, closing.changed()).await.is_err() {
                return Err(VolumeError::IncorrectState(format!(
                    "volume {id} is still closing after {wait:?}"
                )));
            }
        };
        let vol = open().await?;
        slots.insert(id.clone(), Slot::Open(vol.clone()));
        Ok(vol)
    }

    /// Closes `id`'s instance, if open, with `close`, then runs `then` (e.g. deleting the
    /// volume's files), with openers waiting throughout; another close in progress is waited
    /// for first (up to `wait`). Returns the first error of the two steps (`then` runs even when
    /// the close failed: the instance is gone either way).
    ///
    /// Errors: `close`'s and `then`'s; [`VolumeError::IncorrectState`] when another close
    /// outlasts `wait`.
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
        let (tx, rx) = watch::channel(());
        let open = loop {
            let mut slots = self.slots.lock().await;
            let mut closing = match slots.remove(id) {
                Some(Slot::Open(v)) => {
                    slots.insert(id.clone(), Slot::Closing(rx));
                    break Some(v);
                }
                Some(Slot::Closing(other)) => {
                    slots.insert(id.clone(), Slot::Closing(other.clone()));
                    other
                }
                None => {
                    slots.insert(id.clone(), Slot::Closing(rx));
                    break None;
                }
            };
            drop(slots);
            if tokio::time::timeout(wait, closing.changed()).await.is_err() {
                return Err(VolumeError::IncorrectState(format!(
                    "volume {id} is still closing after {wait:?}"
                )));
            }
        };
        let closed = match open {
            Some(v) => close(v).await,
            None => Ok(()),
        };
        let then = then().await;
        self.slots.lock().await.remove(id);
        drop(tx);
        closed.and(then)
    }

    /// Takes every open instance out of the table (crash simulation); closing ones are left.
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

    /// The ids of the volumes open or closing now.
    pub(crate) async fn ids(&self) -> Vec<VolumeId> {
        self.slots.lock().await.keys().cloned().collect()
    }

    /// The open instances (metrics).
    pub(crate) async fn open(&self) -> Vec<Volume> {
        let slots = self.slots.lock().await;
        open_volumes(&slots).cloned().collect()
    }

    /// [`Instances::open`] without waiting: `None` while the table is busy (opening or closing
    /// a volume).
    pub(crate) fn try_open(&self) -> Option<Vec<Volume>> {
        let slots = self.slots.try_lock().ok()?;
        Some(open_volumes(&slots).cloned().collect())
    }
}

/// The open instances in `slots`.
fn open_volumes(slots: &HashMap<VolumeId, Slot>) -> impl Iterator<Item = &Volume> {
    slots.values().filter_map(|s| match s {
        Slot::Open(v) => Some(v),
        Slot::Closing(_) => None,
    })
}
