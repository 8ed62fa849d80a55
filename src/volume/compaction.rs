//! Compaction's input: the live blocks of this volume's sparsest chunks. The flusher uploads
//! and commits them like a flushed chunk.

use std::sync::Arc;

use crate::backend::chunk_key;
use crate::block::{BLOCK_BYTES, BLOCK_SIZE};
use crate::chunk;
use crate::lookup::Target;
use crate::meta::blocking;

use super::read::read_chunk_index;
use super::{Inner, Volume, VolumeError};

/// The live extents of the chunks compaction should rewrite next, with their data; `None` when
/// no chunk is below the threshold.
pub(super) async fn compaction_input(
    inner: &Arc<Inner>,
) -> Result<Option<Vec<chunk::InputExtent>>, VolumeError> {
    let (meta, lookup, id) = (inner.meta.clone(), inner.lookup.clone(), inner.id.clone());
    let threshold = u64::from(inner.config.compaction.threshold_percent);
    let chunk_blocks = (inner.config.chunk_bytes / BLOCK_SIZE).max(1);
    let owner = id.number();
    let picked = blocking(move || {
        let mut candidates: Vec<(u64, crate::meta::ChunkStats)> = meta
            .chunk_stats(&id)?
            .into_iter()
            .filter(|(_, s)| s.live_blocks > 0 && s.live_blocks * 100 < s.data_blocks * threshold)
            .collect();
        candidates.sort_by_key(|(_, s)| (s.live_blocks * 1000) / s.data_blocks.max(1));
        let mut picked = Vec::new();
        let mut blocks = 0;
        for (object_id, s) in candidates {
            if !picked.is_empty() && blocks + s.live_blocks > chunk_blocks {
                break;
            }
            blocks += s.live_blocks;
            picked.push(object_id);
        }
        Ok(picked)
    })
    .await?;
    if picked.is_empty() {
        return Ok(None);
    }
    // Every map extent pointing into a chunk lies inside one of the block ranges its index
    // lists (extents only get cut), so the live extents are found by scanning those ranges
    // of the map, not the whole map, whose scan grows with the volume rather than with the
    // step's work (docs/design/compaction-input-from-chunk-indexes.md).
    let mut ranges = Vec::new();
    for &object_id in &picked {
        let (_, index) = read_chunk_index(&inner.backend, &chunk_key(&inner.id, object_id)).await?;
        ranges.extend(
            index
                .iter()
                .filter(|x| x.kind == chunk::ExtentKind::Data)
                .map(|x| (x.start_block, x.start_block + u64::from(x.block_count))),
        );
    }
    let ranges = merge_ranges(ranges);
    let picked: std::collections::HashSet<u64> = picked.into_iter().collect();
    let extents = blocking(move || {
        Ok(lookup
            .overlapping_ranges(&ranges)?
            .into_iter()
            .filter(|e| matches!(e.target, Target::Data(f) if f.owner == owner && picked.contains(&f.object_id)))
            .collect::<Vec<_>>())
    })
    .await?;
    if extents.is_empty() {
        return Ok(None);
    }
    let volume = Volume {
        inner: inner.clone(),
    };
    let mut input = Vec::with_capacity(extents.len());
    for e in extents {
        let Target::Data(f) = e.target else { continue };
        let frame = volume.frame(f).await?;
        let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
        let len = e.count as usize * BLOCK_BYTES;
        input.push(chunk::InputExtent {
            start_block: e.start,
            block_count: e.count,
            seq: e.seq,
            data: Some(frame.slice(from..from + len)),
        });
    }
    Ok(Some(input))
}

/// `ranges` (block `(start, end)` pairs, any order) sorted and merged where they overlap or
/// touch: sorted ranges with gaps between them, as [`BlockLookup::overlapping_ranges`] takes.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn ranges_merge_where_they_overlap_or_touch() {
        assert_eq!(
            merge_ranges(vec![
                (9, 12),
                (0, 2),
                (2, 4),
                (10, 11),
                (5, 6),
                (7, 7),
                (11, 15)
            ]),
            vec![(0, 4), (5, 6), (9, 15)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}
