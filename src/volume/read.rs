//! The read path: the write buffer's index first, then the BlockLookup map and chunk frames
//! (frame cache, then the backend); blocks in neither read as zeros. [`crate::SnapshotVolume`]
//! reads through the same functions with an empty write buffer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::backend::{chunk_key_of, SharedBackend};
use crate::block::{BlockRange, BLOCK_BYTES, BLOCK_SIZE};
use crate::buffer::{BufExtent, Payload};
use crate::cache::FrameCache;
use crate::chunk::{self, ChunkError};
use crate::lookup::{FrameRef, MapExtent, Target};
use crate::meta::blocking;
use crate::retry::{retry, RetryPolicy};

use super::{check_range, check_request, lock, Volume, VolumeError};

/// A block range `(start, end)` that no memtable covers.
type Holes = (u64, u64);

/// One run of a [`Volume::block_status`] answer (NBD `base:allocation` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// True when the range reads as zeros and has no storage (`NBD_STATE_HOLE | NBD_STATE_ZERO`);
    /// false for stored data.
    pub hole: bool,
}

impl Volume {
    /// Reads `len` bytes at byte `offset`. Never-written and trimmed ranges read as zeros.
    ///
    /// Errors: [`VolumeError::OutOfRange`], [`VolumeError::TooLarge`] above 32 MiB,
    /// [`VolumeError::Backend`] / [`VolumeError::Chunk`] when chunk data cannot be fetched or
    /// verified (NBD maps both to `NBD_EIO`); [`VolumeError::LeaseLost`] (cluster mode).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let data = read_bytes(offset, len, self.inner.size, |r| self.read_blocks(r)).await?;
        // Judged after the read: the data was current while the lease held.
        self.inner.check_tenure()?;
        Ok(data)
    }

    /// Allocation status of `offset..offset + len` in runs (NBD `base:allocation`): stored data
    /// versus holes that read as zeros. Runs are merged and cover the range exactly.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, VolumeError> {
        let runs = status(offset, len, self.inner.size, |r| self.resolve(r)).await?;
        self.inner.check_tenure()?;
        Ok(runs)
    }

    /// The newest buffered extents in `r` (clipped, in block order) and the block ranges the
    /// write buffer does not cover.
    fn resolve_memtables(&self, r: BlockRange) -> (Vec<(u64, BufExtent)>, Vec<Holes>) {
        let found = lock(&self.inner.state).buf.overlapping(r.start, r.end);
        let mut holes = Vec::new();
        let mut cur = r.start;
        for (s, e) in &found {
            if *s > cur {
                holes.push((cur, *s));
            }
            cur = s + e.count;
        }
        if cur < r.end {
            holes.push((cur, r.end));
        }
        (found, holes)
    }

    /// The memtable extents and map extents that make up `r`; blocks in neither read as zeros.
    async fn resolve(&self, r: BlockRange) -> Result<Resolution, VolumeError> {
        let (found, holes) = self.resolve_memtables(r);
        if holes.is_empty() {
            return Ok((found, Vec::new()));
        }
        let lookup = self.inner.lookup.clone();
        let map = blocking(move || {
            let mut out = Vec::new();
            for (s, e) in holes {
                out.extend(lookup.lookup(s, e)?);
            }
            Ok(out)
        })
        .await?;
        Ok((found, map))
    }

    pub(super) async fn read_blocks(&self, r: BlockRange) -> Result<Bytes, VolumeError> {
        let (mem, holes) = self.resolve_memtables(r);
        // Fast path: one memtable extent covers the whole range.
        if let [(
            s,
            BufExtent {
                count,
                payload: Payload::Data(b),
                ..
            },
        )] = &mem[..]
        {
            if *s == r.start && *count == r.len() {
                return Ok(b.clone());
            }
        }
        if holes.is_empty() {
            return Ok(buffered_blocks(r, &mem).freeze());
        }
        // One blocking task: map lookup, then every frame from the cache or, for local backends,
        // read and decoded right there, and the blocks copied into the reply there too (the
        // async threads only send it). Frames a backend cannot read synchronously (S3) are
        // fetched asynchronously afterwards.
        let inner = self.inner.clone();
        let reads = self.inner.reads.clone();
        let (mem, map, mut frames) = match reads
            .run(move || -> Result<_, VolumeError> {
                let mut map = Vec::new();
                for (s, e) in holes {
                    map.extend(inner.lookup.lookup(s, e)?);
                }
                let (mut frames, hits) = cached_frames(&inner.cache, &map);
                inner.stats.frame_hits.fetch_add(hits, Ordering::Relaxed);
                for (at, run) in missing_runs(&map, &frames) {
                    let Some((okey, range)) = run_location(&run) else {
                        continue;
                    };
                    let started = Instant::now();
                    // `None`: not a local backend; everything missing is fetched below.
                    let Some(raw) = inner.backend.get_range_blocking(&okey, range) else {
                        return Ok(Resolved::Fetch(mem, map, frames));
                    };
                    let raw = raw?;
                    inner.get_seconds.record(started.elapsed());
                    inner
                        .stats
                        .frame_fetches
                        .fetch_add(run.len() as u64, Ordering::Relaxed);
                    for (k, d) in decode_run(&inner.cache, &okey, &raw, &run)?
                        .into_iter()
                        .enumerate()
                    {
                        frames[at + k] = Some(d);
                    }
                }
                Ok(Resolved::Done(assemble(r, &mem, &map, frames)))
            })
            .await
            .map_err(|e| VolumeError::task("read", e))??
        {
            Resolved::Done(blocks) => return Ok(blocks),
            Resolved::Fetch(mem, map, frames) => (mem, map, frames),
        };
        let inner = &self.inner;
        fetch_missing_frames(
            &inner.cache,
            &inner.backend,
            &inner.config.read_retry,
            &map,
            &mut frames,
            &|took, n| {
                inner.stats.frame_fetches.fetch_add(n, Ordering::Relaxed);
                inner.get_seconds.record(took);
            },
        )
        .await?;
        Ok(assemble(r, &mem, &map, frames))
    }

    /// A decompressed, verified frame, from the cache or the backend (ranged read).
    pub(super) async fn frame(&self, f: FrameRef) -> Result<Bytes, VolumeError> {
        let inner = &self.inner;
        fetch_frame(
            &inner.cache,
            &inner.backend,
            &inner.config.read_retry,
            f,
            |took| {
                inner.stats.frame_fetches.fetch_add(1, Ordering::Relaxed);
                inner.get_seconds.record(took);
            },
        )
        .await
    }
}

/// A frame's cache key, object key (in its owner volume's objects) and byte range in the object.
pub(crate) fn frame_location(
    f: &FrameRef,
) -> (crate::cache::FrameKey, String, std::ops::Range<u64>) {
    let range = u64::from(f.offset)..u64::from(f.offset) + u64::from(f.len);
    (frame_key(f), chunk_key_of(f.owner, f.object_id), range)
}

/// The frame cache's key of frame `f` (no object key formatted, unlike [`frame_location`]).
fn frame_key(f: &FrameRef) -> crate::cache::FrameKey {
    // The cache key's tag is the owner's low 64 bits ([`VolumeId::tag`]).
    (f.owner as u64, f.object_id, f.offset)
}

/// Header and index of chunk object `key` (FORMAT.md, "Chunk object"), with two ranged reads
/// from `backend` (the header, then header + index), each retried.
///
/// Errors: [`VolumeError::Backend`] (missing object, transport), [`VolumeError::Chunk`] (short
/// or corrupt header or index).
pub(crate) async fn read_chunk_index(
    backend: &SharedBackend,
    key: &str,
) -> Result<(chunk::ChunkHeader, Vec<chunk::ChunkExtent>), VolumeError> {
    use crate::chunk::{decode_header, decode_index, CHUNK_HEADER_LEN};
    let policy = RetryPolicy::reads();
    let head = retry(&policy, key, || {
        backend.get_range(key, 0..CHUNK_HEADER_LEN as u64)
    })
    .await?;
    let corrupt = |source| VolumeError::Chunk {
        key: key.to_owned(),
        source,
    };
    let header = decode_header(&head).map_err(corrupt)?;
    if header.extent_count > 1 << 20 {
        return Err(corrupt(ChunkError::BadIndex(format!(
            "{} extents",
            header.extent_count
        ))));
    }
    let len = header.index_len();
    let index = retry(&policy, key, || backend.get_range(key, 0..len)).await?;
    decode_index(&index, u64::MAX).map_err(corrupt)
}

/// A decompressed, verified frame from `cache`, or fetched from `backend` with a ranged read
/// (retried by `policy`) and decoded off the reactor; `fetched(duration)` is called after a GET.
pub(crate) async fn fetch_frame(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    f: FrameRef,
    fetched: impl FnOnce(Duration),
) -> Result<Bytes, VolumeError> {
    let (key, okey, range) = frame_location(&f);
    cache
        .get_or_insert_async(&key, async {
            let started = Instant::now();
            let raw = retry(policy, &okey, || backend.get_range(&okey, range.clone())).await?;
            fetched(started.elapsed());
            tokio::task::spawn_blocking(move || decode_fetched(&okey, &raw, &f, true))
                .await
                .map_err(|e| VolumeError::task("decode", e))?
        })
        .await
}

/// Fetches every data frame of `map` that `frames` (same order) does not hold yet, concurrently:
/// frames back to back in one object ([`extends_run`]) with one ranged read (retried by
/// `policy`), decoded off the reactor and cached; a lone frame through [`fetch_frame`], so
/// concurrent misses for it coalesce. `fetched(duration, frames)` is called after each read.
async fn fetch_missing_frames(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    map: &[MapExtent],
    frames: &mut [Option<Bytes>],
    fetched: &(dyn Fn(Duration, u64) + Sync),
) -> Result<(), VolumeError> {
    let runs = missing_runs(map, frames);
    let fetches = runs.into_iter().map(|(at, run)| async move {
        let data = match run[..] {
            [f] => vec![fetch_frame(cache, backend, policy, f, |took| fetched(took, 1)).await?],
            _ => fetch_run(cache, backend, policy, run, fetched).await?,
        };
        Ok::<_, VolumeError>((at, data))
    });
    for (at, data) in futures::future::try_join_all(fetches).await? {
        for (k, d) in data.into_iter().enumerate() {
            frames[at + k] = Some(d);
        }
    }
    Ok(())
}

/// Frames `run` (back to back in one object) with one ranged read, verified, decoded and cached.
async fn fetch_run(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    run: Vec<FrameRef>,
    fetched: &(dyn Fn(Duration, u64) + Sync),
) -> Result<Vec<Bytes>, VolumeError> {
    let Some((okey, range)) = run_location(&run) else {
        return Ok(Vec::new());
    };
    let started = Instant::now();
    let raw = retry(policy, &okey, || backend.get_range(&okey, range.clone())).await?;
    fetched(started.elapsed(), run.len() as u64);
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || decode_run(&cache, &okey, &raw, &run))
        .await
        .map_err(|e| VolumeError::task("decode", e))?
}

/// Threads that run one volume's blocking read work at once: enough to overlap reads that wait
/// on the disk, few enough to cost page-cache-hot reads next to nothing
/// (docs/design/read-queue.md).
pub(super) const READ_WORKERS: usize = 8;

/// Most bytes one read of adjacent frames covers (a 1 MiB request of 16 KiB frames is one read).
const MAX_FRAME_RUN_BYTES: u64 = 1 << 20;

/// Whether frame `g` continues `run`: stored right after its last frame in the same object,
/// and the run stays within [`MAX_FRAME_RUN_BYTES`].
fn extends_run(run: &[FrameRef], g: &FrameRef) -> bool {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return true;
    };
    let end = u64::from(last.offset) + u64::from(last.len);
    g.owner == first.owner
        && g.object_id == first.object_id
        && u64::from(g.offset) == end
        && end + u64::from(g.len) - u64::from(first.offset) <= MAX_FRAME_RUN_BYTES
}

/// `map`'s data frames that `cache` holds (same order; `None` for the others and for zero
/// extents), and how many it held.
fn cached_frames(cache: &FrameCache, map: &[MapExtent]) -> (Vec<Option<Bytes>>, u64) {
    let mut hits = 0;
    let frames = map
        .iter()
        .map(|e| match e.target {
            Target::Data(f) => {
                let hit = cache.get(&frame_key(&f));
                hits += u64::from(hit.is_some());
                hit
            }
            Target::Zero => None,
        })
        .collect();
    (frames, hits)
}

/// The data frames of `map` that `frames` (same order) does not hold, grouped into runs back
/// to back in one object ([`extends_run`]), each with the index of its first frame.
fn missing_runs(map: &[MapExtent], frames: &[Option<Bytes>]) -> Vec<(usize, Vec<FrameRef>)> {
    let mut runs: Vec<(usize, Vec<FrameRef>)> = Vec::new();
    for (i, (e, have)) in map.iter().zip(frames).enumerate() {
        let (Target::Data(g), None) = (e.target, have) else {
            continue;
        };
        match runs.last_mut() {
            Some((at, run)) if *at + run.len() == i && extends_run(run, &g) => run.push(g),
            _ => runs.push((i, vec![g])),
        }
    }
    runs
}

/// Object key and byte range holding all of `run` (`None` for an empty run).
fn run_location(run: &[FrameRef]) -> Option<(String, std::ops::Range<u64>)> {
    let (first, last) = (run.first()?, run.last()?);
    Some((
        chunk_key_of(first.owner, first.object_id),
        u64::from(first.offset)..u64::from(last.offset) + u64::from(last.len),
    ))
}

/// Splits `raw` (the bytes of `run`, read from object `okey` in one piece) into frames,
/// verifies and decodes each and caches it.
fn decode_run(
    cache: &FrameCache,
    okey: &str,
    raw: &Bytes,
    run: &[FrameRef],
) -> Result<Vec<Bytes>, VolumeError> {
    let Some(first) = run.first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(run.len());
    for g in run {
        let at = (g.offset - first.offset) as usize;
        let need = at + g.len as usize;
        if need > raw.len() {
            tracing::error!(key = %okey, "short ranged read of a chunk object");
            return Err(VolumeError::Chunk {
                key: okey.to_owned(),
                source: ChunkError::Truncated {
                    need,
                    have: raw.len(),
                },
            });
        }
        let data = decode_fetched(okey, &raw.slice(at..need), g, run.len() == 1)?;
        cache.insert(frame_key(g), data.clone());
        out.push(data);
    }
    Ok(out)
}

/// What a read's blocking task found: the blocks, or what it could not read synchronously.
enum Resolved {
    /// The blocks of the range.
    Done(Bytes),
    /// Write buffer extents, map extents and the frames read so far (same order as the map);
    /// the missing frames are fetched asynchronously.
    Fetch(Vec<(u64, BufExtent)>, Vec<MapExtent>, Vec<Option<Bytes>>),
}

/// Block range `r` from the write buffer's extents `mem` and the map's extents `map` (whose
/// frames are in `frames`, same order); blocks in neither are zeros. When one extent covers the
/// whole range (a 4 KiB read, mostly) a slice of its frame, not a copy.
fn assemble(
    r: BlockRange,
    mem: &[(u64, BufExtent)],
    map: &[MapExtent],
    frames: Vec<Option<Bytes>>,
) -> Bytes {
    if let ([], [e], [Some(frame)]) = (mem, map, &frames[..]) {
        if let Target::Data(f) = e.target {
            let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
            let len = e.count as usize * BLOCK_BYTES;
            if e.start == r.start && e.count == r.len() && from + len <= frame.len() {
                return frame.slice(from..from + len);
            }
        }
    }
    let mut out = buffered_blocks(r, mem);
    fill_from_frames(&mut out, r, map, frames);
    out.freeze()
}

/// Block range `r` as zeros with the write buffer's data extents `mem` (from
/// `WriteBuffer::overlapping`) copied in.
fn buffered_blocks(r: BlockRange, mem: &[(u64, BufExtent)]) -> BytesMut {
    let mut out = BytesMut::zeroed(r.len() as usize * BLOCK_BYTES);
    for (s, e) in mem {
        if let Payload::Data(b) = &e.payload {
            let at = ((s - r.start) as usize) * BLOCK_BYTES;
            out[at..at + b.len()].copy_from_slice(b);
        }
    }
    out
}

/// Copies the blocks of the data extents in `map` (whose frames are in `frames`, same order)
/// into `out`, which holds block range `r`.
fn fill_from_frames(out: &mut [u8], r: BlockRange, map: &[MapExtent], frames: Vec<Option<Bytes>>) {
    for (e, frame) in map.iter().zip(frames) {
        let (Target::Data(f), Some(frame)) = (e.target, frame) else {
            continue;
        };
        let from = ((e.start - f.first_block) as usize) * BLOCK_BYTES;
        let len = e.count as usize * BLOCK_BYTES;
        let at = ((e.start - r.start) as usize) * BLOCK_BYTES;
        out[at..at + len].copy_from_slice(&frame[from..from + len]);
    }
}

/// Bytes `offset..offset + len` of a device of `size` bytes, cut from the blocks covering them,
/// which `read_blocks` reads (an empty read reads nothing).
///
/// Errors: [`VolumeError::OutOfRange`], [`VolumeError::TooLarge`] above 32 MiB, and
/// `read_blocks`'s.
pub(crate) async fn read_bytes<Fut>(
    offset: u64,
    len: u64,
    size: u64,
    read_blocks: impl FnOnce(BlockRange) -> Fut,
) -> Result<Bytes, VolumeError>
where
    Fut: std::future::Future<Output = Result<Bytes, VolumeError>>,
{
    check_request(offset, len, size)?;
    if len == 0 {
        return Ok(Bytes::new());
    }
    let r = BlockRange::covering(offset, len);
    let blocks = read_blocks(r).await?;
    let skip = (offset - r.start * BLOCK_SIZE) as usize;
    Ok(blocks.slice(skip..skip + len as usize))
}

/// The allocation status of bytes `offset..offset + len` of a device of `size` bytes, from the
/// write buffer and map extents that `resolve` finds for the blocks covering them.
///
/// Errors: [`VolumeError::OutOfRange`], and `resolve`'s.
pub(crate) async fn status<Fut>(
    offset: u64,
    len: u64,
    size: u64,
    resolve: impl FnOnce(BlockRange) -> Fut,
) -> Result<Vec<StatusExtent>, VolumeError>
where
    Fut: std::future::Future<Output = Result<Resolution, VolumeError>>,
{
    check_range(offset, len, size)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    let (mem, map) = resolve(BlockRange::covering(offset, len)).await?;
    Ok(allocation(offset, len, &mem, &map))
}

/// The write buffer's extents (start block, extent) and the map's extents that make up a block
/// range; blocks in neither read as zeros.
pub(crate) type Resolution = (Vec<(u64, BufExtent)>, Vec<MapExtent>);

/// Allocation runs (NBD `base:allocation`) of bytes `offset..offset + len`, whose blocks are
/// made up of the write buffer's extents `mem` and the map's extents `map`: their data extents
/// are stored data, everything else is a hole.
pub(crate) fn allocation(
    offset: u64,
    len: u64,
    mem: &[(u64, BufExtent)],
    map: &[MapExtent],
) -> Vec<StatusExtent> {
    let data: Vec<(u64, u64)> = mem
        .iter()
        .filter(|(_, e)| matches!(e.payload, Payload::Data(_)))
        .map(|(s, e)| (*s, s + e.count))
        .chain(
            map.iter()
                .filter(|e| matches!(e.target, Target::Data(_)))
                .map(|e| (e.start, e.end())),
        )
        .collect();
    status_runs(offset, len, data)
}

/// Block range `r` made up of the map's extents `map` alone (a snapshot has no write buffer):
/// frames from `cache`, the missing ones fetched from `backend` (retried by `policy`).
///
/// Errors: [`VolumeError::Backend`] / [`VolumeError::Chunk`] when a frame cannot be fetched or
/// verified.
pub(crate) async fn read_map(
    cache: &FrameCache,
    backend: &SharedBackend,
    policy: &RetryPolicy,
    r: BlockRange,
    map: &[MapExtent],
) -> Result<Bytes, VolumeError> {
    let (mut frames, _) = cached_frames(cache, map);
    fetch_missing_frames(cache, backend, policy, map, &mut frames, &|_, _| {}).await?;
    Ok(assemble(r, &[], map, frames))
}

/// Merged `base:allocation` runs covering bytes `offset..offset + len`, from the block ranges
/// `data` (start, end) that hold stored data; everything else is a hole.
fn status_runs(offset: u64, len: u64, mut data: Vec<(u64, u64)>) -> Vec<StatusExtent> {
    data.sort_unstable();
    let end = offset + len;
    let mut out: Vec<StatusExtent> = Vec::new();

    let push = |from: u64, to: u64, hole: bool, out: &mut Vec<StatusExtent>| {
        let (from, to) = (from.max(offset), to.min(end));
        if from >= to {
            return;
        }
        match out.last_mut() {
            Some(last) if last.hole == hole => last.len += to - from,
            _ => out.push(StatusExtent {
                len: to - from,
                hole,
            }),
        }
    };
    let mut cur = offset;
    for (s, e) in data {
        let (s, e) = (s * BLOCK_SIZE, e * BLOCK_SIZE);
        push(cur, s, true, &mut out);
        push(s, e, false, &mut out);
        cur = cur.max(e);
    }
    push(cur, end, true, &mut out);
    out
}

/// Verifies and decodes frame `f` fetched from object `okey`; corruption is logged with the key.
/// With `alone` (`frame` is the whole buffer of its read) a raw frame is shared, not copied; a
/// frame read together with others is copied, so a cached frame never holds its neighbours.
fn decode_fetched(
    okey: &str,
    frame: &Bytes,
    f: &FrameRef,
    alone: bool,
) -> Result<Bytes, VolumeError> {
    let decoded = if alone {
        chunk::decode_shared_frame(frame, f.crc, f.blocks, f.encoding)
    } else {
        chunk::decode_frame(frame, f.crc, f.blocks, f.encoding)
    };
    decoded.map_err(|source| {
        tracing::error!(key = %okey, error = %source, "corrupt chunk frame");
        VolumeError::Chunk {
            key: okey.to_owned(),
            source,
        }
    })
}
