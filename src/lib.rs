//! vblock core: virtual block volumes stored as a write-ahead log plus immutable chunk objects.
//!
//! Layers, each in its own module: [`wal`] (segments, group commit, replay), [`buffer`]
//! (memtables), [`chunk`] (object format), [`backend`] (file / memory object stores),
//! [`lookup`] (the BlockLookup extent map in RocksDB, via [`meta`]), [`volume`] (the byte-level
//! engine API) and [`engine`] (all volumes of a daemon). Formats are specified in `docs/FORMAT.md`.
#![warn(missing_docs)]

pub mod backend;
pub mod background;
pub mod block;
pub mod buffer;
pub mod cache;
pub mod chunk;
pub mod cluster;
mod codec;
pub mod control;
pub mod engine;
pub mod failpoints;
pub mod fs;
pub mod fsck;
pub mod gc;
pub mod ids;
mod instances;
pub mod lookup;
pub mod mapobj;
pub mod meta;
pub mod records;
mod recovery;
pub mod retry;
pub mod snapshot;
mod takeover;
pub mod volume;
pub mod wal;
pub mod workq;

pub use engine::{Engine, EngineConfig};
pub use ids::{SnapshotId, VolumeId};
pub use recovery::OnDamage;
pub use snapshot::SnapshotVolume;
pub use volume::{StatusExtent, Volume, VolumeConfig, VolumeError};
