//! Offline consistency checks of a stopped daemon's data (`vblock fsck`, `vblock inspect volume`):
//! WAL segments and records verify (only the newest segment may end in a torn record), the map
//! is not behind the WAL's trim mark, every chunk object verifies, and every map extent points
//! at a frame that exists and matches its chunk's index. Findings are typed; the CLI prints them.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::backend::{chunk_key, chunk_key_of, SharedBackend};
use crate::block::BLOCK_SIZE;
use crate::chunk::{self, ChunkExtent};
use crate::ids::VolumeId;
use crate::lookup::{BlockLookup, FrameRef, Target};
use crate::meta::{blocking, MetaStore};
use crate::records::VolumeRecord;
use crate::volume::VolumeError;
use crate::wal::{self, RecordKind};

/// One thing a check found in a volume's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A WAL segment other than the newest has a header that does not decode.
    BadSegmentHeader {
        /// Segment file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// A record that does not verify in a WAL segment other than the newest.
    BadRecord {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the record in the file.
        offset: u64,
        /// Why.
        error: String,
    },
    /// The newest segment ends in a record that does not verify: a torn write that replay
    /// truncates (not a problem by itself; replay refuses it when a sync note covers it).
    TornTail {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the torn record.
        offset: u64,
        /// Why it does not verify.
        error: String,
    },
    /// The map's checkpoint is behind the WAL's trim mark with records missing in between: the
    /// map lost committed chunks (FORMAT.md, "Trim mark").
    MapBehindTrimMark {
        /// The map's checkpoint (sequence number).
        checkpoint: u64,
        /// Records up to this sequence number may have been deleted.
        trimmed_through: u64,
        /// The oldest record the WAL holds, if any.
        first_seq: Option<u64>,
    },
    /// The WAL's trim mark does not verify.
    BadTrimMark(String),
    /// A chunk object is missing or does not verify.
    BadChunk {
        /// Object key.
        key: String,
        /// Why.
        error: String,
    },
    /// A map extent reaches past the volume's size.
    ExtentBeyondSize {
        /// First block.
        start: u64,
        /// Block after the last.
        end: u64,
    },
    /// A map extent points at a frame that its chunk's index does not list.
    ExtentWithoutFrame {
        /// First block.
        start: u64,
        /// Block after the last.
        end: u64,
        /// Object key of the chunk.
        key: String,
        /// Byte offset of the frame in the object.
        frame_offset: u32,
    },
}

impl Finding {
    /// True for damage; false for what replay repairs by itself (a torn tail).
    pub fn is_problem(&self) -> bool {
        !matches!(self, Finding::TornTail { .. })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::BadSegmentHeader { path, error } => {
                write!(f, "{}: bad segment header: {error}", path.display())
            }
            Finding::BadRecord {
                path,
                offset,
                error,
            } => write!(
                f,
                "{}: bad record at byte {offset}: {error}",
                path.display()
            ),
            Finding::TornTail {
                path,
                offset,
                error,
            } => write!(
                f,
                "{}: torn tail at byte {offset} ({error}); replay will truncate it",
                path.display()
            ),
            Finding::MapBehindTrimMark {
                checkpoint,
                trimmed_through,
                first_seq,
            } => write!(
                f,
                "map checkpoint {checkpoint} is behind the WAL's trim mark {trimmed_through} \
                 (oldest record {first_seq:?}): the map lost committed chunks"
            ),
            Finding::BadTrimMark(e) => write!(f, "{e}"),
            Finding::BadChunk { key, error } => write!(f, "chunk {key}: {error}"),
            Finding::ExtentBeyondSize { start, end } => {
                write!(f, "map extent {start}..{end} beyond the volume size")
            }
            Finding::ExtentWithoutFrame {
                start,
                end,
                key,
                frame_offset,
            } => write!(
                f,
                "map extent {start}..{end} points at {key} frame @{frame_offset} which does not \
                 exist or does not match"
            ),
        }
    }
}

/// Checks the WAL directory `dir` of a volume whose map checkpoint is `checkpoint`.
///
/// Errors: [`VolumeError::Io`] when a segment cannot be read, [`VolumeError::Wal`] when the
/// directory cannot be listed.
pub fn check_wal(dir: &Path, checkpoint: u64) -> Result<Vec<Finding>, VolumeError> {
    let mut out = Vec::new();
    let files = wal::segment_files(dir)?;
    let mut first_seq = None;
    for (i, path) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|source| VolumeError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        let scan = wal::scan_segment(&bytes);
        if first_seq.is_none() {
            first_seq = scan
                .records
                .iter()
                .find(|(_, h)| h.kind != RecordKind::SyncNote)
                .map(|(_, h)| h.seq);
        }
        let newest = i + 1 == files.len();
        let path = path.clone();
        match (scan.header, scan.error) {
            (Err(e), _) if !newest => out.push(Finding::BadSegmentHeader {
                path,
                error: e.to_string(),
            }),
            (Err(_), _) | (Ok(_), None) => {}
            (Ok(_), Some((offset, e))) if newest => out.push(Finding::TornTail {
                path,
                offset,
                error: e.to_string(),
            }),
            (Ok(_), Some((offset, e))) => out.push(Finding::BadRecord {
                path,
                offset,
                error: e.to_string(),
            }),
        }
    }
    match wal::read_trim_mark(dir) {
        Ok(mark) if wal::map_behind(checkpoint, mark, first_seq) => {
            out.push(Finding::MapBehindTrimMark {
                checkpoint,
                trimmed_through: mark,
                first_seq,
            })
        }
        Ok(_) => {}
        Err(e) => out.push(Finding::BadTrimMark(e.to_string())),
    }
    Ok(out)
}

/// The index of chunk object `key` after verifying the whole object; `None`, with a
/// [`Finding::BadChunk`] added to `out`, when it is missing or bad.
async fn verified_index(
    backend: &SharedBackend,
    key: &str,
    out: &mut Vec<Finding>,
) -> Option<Vec<ChunkExtent>> {
    let result = match backend.get(key).await {
        Ok(obj) => chunk::verify(&obj)
            .map(|(_, index)| index)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    result
        .map_err(|error| {
            out.push(Finding::BadChunk {
                key: key.to_owned(),
                error,
            })
        })
        .ok()
}

/// Whether chunk index entry `c` is the frame `f` points at.
fn frame_matches(c: &ChunkExtent, f: &FrameRef) -> bool {
    c.start_block == f.first_block
        && c.frame_offset == f.offset
        && c.frame_len == f.len
        && c.frame_crc == f.crc
        && c.block_count == f.blocks
        && c.encoding == f.encoding
}

/// Checks volume `rec`'s chunks and map: every chunk object it owns verifies, and every map
/// extent lies inside the volume and points at a frame its chunk lists. A clone's extents that
/// point into its source volume's chunks are checked against those chunks (verified when first
/// met). Reads whole objects from `backend`.
///
/// Errors: [`VolumeError::Meta`] when the map cannot be read.
pub async fn check_chunks(
    meta: &MetaStore,
    backend: &SharedBackend,
    rec: &VolumeRecord,
) -> Result<Vec<Finding>, VolumeError> {
    let id = &rec.volume_id;
    let mut out = Vec::new();
    let (m, v) = (meta.clone(), id.clone());
    let (stats, extents) = blocking(move || {
        let stats = m.chunk_stats(&v)?;
        let extents = BlockLookup::new(m, v).lookup(0, u64::MAX)?;
        Ok((stats, extents))
    })
    .await?;
    // Indexes by (owner, object id), `None` for a bad chunk (reported once).
    let mut indexes: HashMap<(u128, u64), Option<Vec<ChunkExtent>>> = HashMap::new();
    for (object_id, _) in stats {
        let index = verified_index(backend, &chunk_key(id, object_id), &mut out).await;
        indexes.insert((id.number(), object_id), index);
    }
    for e in extents {
        if e.end() * BLOCK_SIZE > rec.size_bytes {
            out.push(Finding::ExtentBeyondSize {
                start: e.start,
                end: e.end(),
            });
        }
        let Target::Data(f) = e.target else { continue };
        let index = match indexes.entry((f.owner, f.object_id)) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let key = chunk_key_of(f.owner, f.object_id);
                v.insert(verified_index(backend, &key, &mut out).await)
            }
        };
        let found = index
            .as_ref()
            .is_some_and(|index| index.iter().any(|c| frame_matches(c, &f)));
        if !found {
            out.push(Finding::ExtentWithoutFrame {
                start: e.start,
                end: e.end(),
                key: chunk_key_of(f.owner, f.object_id),
                frame_offset: f.offset,
            });
        }
    }
    Ok(out)
}

/// What `vblock inspect volume` shows of a volume besides its record.
#[derive(Debug, Clone)]
pub struct VolumeSummary {
    /// The engine state (checkpoint, highest sequence number, next object id).
    pub state: crate::meta::VolumeState,
    /// Extents in the map.
    pub map_extents: u64,
    /// Blocks the map holds data for.
    pub data_blocks: u64,
    /// Chunk objects the volume owns.
    pub chunks: usize,
    /// Bytes those chunk objects take in the backend.
    pub stored_bytes: u64,
    /// Blocks of those chunks the map still points at.
    pub live_blocks: u64,
}

/// The summary of volume `id` from the metadata alone.
///
/// Errors: [`VolumeError::Meta`].
pub fn summarize(meta: &MetaStore, id: &VolumeId) -> Result<VolumeSummary, VolumeError> {
    let state = meta.volume_state(id)?;
    let (map_extents, data_blocks) = BlockLookup::new(meta.clone(), id.clone()).summary()?;
    let chunks = meta.chunk_stats(id)?;
    Ok(VolumeSummary {
        state,
        map_extents,
        data_blocks,
        chunks: chunks.len(),
        stored_bytes: chunks.iter().map(|(_, s)| s.stored_bytes).sum(),
        live_blocks: chunks.iter().map(|(_, s)| s.live_blocks).sum(),
    })
}
