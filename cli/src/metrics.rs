//! The Prometheus endpoint of `vblock serve` (`--metrics-listen`, `GET /metrics`).
//!
//! Hot paths record into `metrics` handles where the work happens (NBD requests, WAL fsyncs,
//! chunk uploads, backend GETs, NATS requests); state that is cheaper to read than to track
//! (buffer fill, WAL on disk, volume sizes, counters the engine already keeps) is sampled once a
//! second by [`sample`]. Every name is listed in docs/OPERATIONS.md.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use metrics_util::MetricKindMask;
use vblock::Engine;

/// Histogram buckets in seconds, 10 µs .. 10 s: covers a page-cache hit up to an S3 retry.
const BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often engine state is sampled into gauges and counters.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the global recorder and serves `/metrics` on `listen` (a task on the current tokio
/// runtime). Gauges of volumes that stop being sampled (deleted, closed) are dropped after a
/// minute.
///
/// Errors: the address cannot be bound, or the recorder is already installed.
pub fn install(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
        .install()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(())
}

/// `# HELP` text for every metric vblock exports: the one list of names (docs/OPERATIONS.md
/// shows them with their labels).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "vblock_nbd_requests_total",
        "NBD requests by volume and op."
    );
    describe_counter!(
        "vblock_nbd_request_errors_total",
        "NBD requests answered with an error, by volume and op."
    );
    describe_counter!(
        "vblock_nbd_request_bytes_total",
        Unit::Bytes,
        "Payload bytes of NBD reads and writes."
    );
    describe_histogram!(
        "vblock_nbd_request_duration_seconds",
        Unit::Seconds,
        "NBD request latency, from parsed request to queued reply."
    );
    describe_gauge!(
        "vblock_nbd_connections",
        "NBD connections in transmission, by volume."
    );
    describe_counter!(
        "vblock_nbd_connections_accepted_total",
        "NBD connections accepted."
    );
    describe_counter!(
        "vblock_nbd_connections_rejected_total",
        "NBD connections refused at the connection limit."
    );
    describe_counter!(
        "vblock_nbd_handshake_failures_total",
        "NBD handshakes that failed or timed out."
    );
    describe_histogram!(
        "vblock_wal_fsync_duration_seconds",
        Unit::Seconds,
        "WAL fdatasync latency (one per group commit)."
    );
    describe_counter!("vblock_wal_fsyncs_total", "WAL fdatasync calls.");
    describe_counter!(
        "vblock_wal_bytes_total",
        Unit::Bytes,
        "Bytes appended to the WAL."
    );
    describe_gauge!(
        "vblock_wal_pending_bytes",
        Unit::Bytes,
        "Bytes in WAL segments not yet trimmed (data not yet in committed chunks)."
    );
    describe_gauge!("vblock_wal_segments", "WAL segment files on disk.");
    describe_counter!(
        "vblock_wal_shipped_objects_total",
        "Shipped WAL objects stored in the backend (--ship-wal)."
    );
    describe_counter!(
        "vblock_wal_shipped_bytes_total",
        Unit::Bytes,
        "Bytes of shipped WAL objects stored in the backend (--ship-wal)."
    );
    describe_gauge!(
        "vblock_wal_unshipped_bytes",
        Unit::Bytes,
        "WAL records queued for shipping and not yet being shipped (--ship-wal): the shipped WAL's lag."
    );
    describe_histogram!(
        "vblock_wal_ship_duration_seconds",
        Unit::Seconds,
        "One shipped WAL object's conditional PUT, retries included (--ship-wal)."
    );
    describe_gauge!(
        "vblock_volume_failed",
        "1 once the volume refuses writes and flushes until it is reopened (a failed WAL fdatasync, or a permanent flusher failure; the log says which)."
    );
    describe_gauge!(
        "vblock_wal_unwritten_bytes",
        Unit::Bytes,
        "Records appended but not yet written to a segment: the WAL writer's backlog (at most 32 MiB; writers wait for room, or fail while the WAL disk is full)."
    );
    describe_counter!(
        "vblock_wal_backlog_waits_total",
        "Writes that waited for room in the WAL writer's backlog (32 MiB): the WAL disk was slower than the writers."
    );
    describe_gauge!(
        "vblock_buffer_bytes",
        Unit::Bytes,
        "Data in the write buffer, not yet uploaded in chunks (the upload lag)."
    );
    describe_gauge!(
        "vblock_buffer_capacity_bytes",
        Unit::Bytes,
        "Write buffer size per volume (--buffer-size)."
    );
    describe_counter!(
        "vblock_chunks_uploaded_total",
        "Chunk objects uploaded and committed."
    );
    describe_counter!(
        "vblock_chunks_uncompressed_total",
        "Chunk objects stored with every frame raw because the flusher was behind the writers \
         (write buffer more than half full, an upload slot free)."
    );
    describe_counter!(
        "vblock_chunk_upload_bytes_total",
        Unit::Bytes,
        "Stored (compressed) bytes of uploaded chunk objects."
    );
    describe_histogram!(
        "vblock_chunk_upload_duration_seconds",
        Unit::Seconds,
        "Chunk PUT latency, retries included."
    );
    describe_histogram!(
        "vblock_map_commit_duration_seconds",
        Unit::Seconds,
        "Map commit latency (one synced RocksDB batch per chunk object), retries included."
    );
    describe_histogram!(
        "vblock_backend_get_duration_seconds",
        Unit::Seconds,
        "Ranged GET latency of one chunk frame, by backend."
    );
    describe_counter!(
        "vblock_cache_hits_total",
        "Chunk frames served from the frame cache."
    );
    describe_counter!(
        "vblock_cache_misses_total",
        "Chunk frames fetched from the backend."
    );
    describe_counter!(
        "vblock_flush_retries_total",
        "Failed chunk uploads, map commits and WAL syncs the flusher retried."
    );
    describe_counter!(
        "vblock_s3_unsigned_payload_puts_total",
        "S3 PUTs sent over HTTPS as UNSIGNED-PAYLOAD (no SigV4 SHA-256 of the body)."
    );
    describe_gauge!("vblock_volumes", "Volumes on this daemon.");
    describe_gauge!("vblock_volume_size_bytes", Unit::Bytes, "Volume size.");
    describe_gauge!(
        "vblock_volume_attached",
        "1 if the volume is attached to an instance."
    );
    describe_gauge!(
        "vblock_volume_mounted",
        "1 if the volume is mounted (ebs.mount)."
    );
    describe_gauge!(
        "vblock_volume_allocated_bytes",
        Unit::Bytes,
        "Blocks of the volume holding data x 4096 (shared clone blocks included)."
    );
    describe_gauge!(
        "vblock_volume_stored_bytes",
        Unit::Bytes,
        "Chunk objects the volume wrote that still exist in the backend."
    );
    describe_gauge!(
        "vblock_volume_dead_bytes",
        Unit::Bytes,
        "Stored bytes the volume's map no longer uses: what compaction and GC still have to reclaim."
    );
    describe_gauge!(
        "vblock_volume_compression_ratio",
        "Logical data bytes per stored byte of the volume's chunks."
    );
    describe_counter!(
        "vblock_compaction_chunks_total",
        "Chunk objects written by compaction."
    );
    describe_counter!(
        "vblock_compaction_bytes_total",
        Unit::Bytes,
        "Live bytes compaction rewrote (its progress through the dead-byte backlog)."
    );
    describe_counter!(
        "vblock_gc_deleted_objects_total",
        "Chunk objects deleted by garbage collection."
    );
    describe_counter!(
        "vblock_gc_deleted_bytes_total",
        Unit::Bytes,
        "Stored bytes of chunk objects deleted by garbage collection."
    );
    describe_counter!(
        "vblock_gc_checkpoints_total",
        "Map checkpoints garbage collection wrote to the backend before deleting a live volume's objects."
    );
    describe_counter!(
        "vblock_gc_checkpoint_bytes_total",
        Unit::Bytes,
        "Bytes of those map checkpoints."
    );
    describe_gauge!(
        "vblock_gc_waiting_objects",
        "Garbage candidates (chunks their own volume's map no longer uses) the last periodic pass left for later: fewer bytes than their volume's map checkpoint, for up to --gc-max-delay."
    );
    describe_gauge!("vblock_snapshots", "Snapshots on this daemon.");
    describe_gauge!(
        "vblock_frame_cache_bytes",
        Unit::Bytes,
        "Decompressed chunk frames in the shared frame cache (bounded by --cache-size)."
    );
    describe_gauge!(
        "vblock_meta_cache_capacity_bytes",
        Unit::Bytes,
        "RocksDB's block cache's current capacity: --meta-cache-size, less what it gave up to \
         keep the daemon under --memory-target (after the frame cache)."
    );
    describe_gauge!(
        "vblock_frame_cache_capacity_bytes",
        Unit::Bytes,
        "The frame cache's current capacity: --cache-size, less what it gave up to keep the \
         daemon under --memory-target."
    );
    describe_gauge!(
        "vblock_meta_memory_bytes",
        Unit::Bytes,
        "RocksDB's memory by kind: memtables, table_readers (index and filter blocks), block_cache."
    );
    describe_counter!(
        "vblock_nats_requests_total",
        "Control-plane requests by operation and result (ok or the EC2 error code)."
    );
    describe_histogram!(
        "vblock_nats_request_duration_seconds",
        Unit::Seconds,
        "Control-plane request latency by operation."
    );
}

/// Samples `engine` every [`SAMPLE_INTERVAL`] for ever.
pub async fn sample(engine: Arc<Engine>, buffer_capacity: u64) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_space = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let space = tokio::time::Instant::now() >= next_space;
        let scanned = sample_once(&engine, buffer_capacity, space).await;
        if space {
            next_space = tokio::time::Instant::now() + scan_interval(SPACE_INTERVAL, scanned);
        }
    }
}

/// The space gauges scan each volume's whole map (`Engine::volume_space`): at most this often.
const SPACE_INTERVAL: Duration = Duration::from_secs(10);

/// Whole-map scans (the space gauges here, GC's mark pass in `serve`) take at most
/// 1/`SCAN_SHARE` of the time (5% of one core): a scan's time grows with the map, so a large
/// volume written in scattered 4 KiB blocks can take longer to scan than a fixed 10 s period,
/// which would then scan for ever (docs/design/paced-map-checkpoints.md).
const SCAN_SHARE: u32 = 20;

/// Time until the next whole-map scan, at least `interval`, after one that took `scanned`.
pub(crate) fn scan_interval(interval: Duration, scanned: Duration) -> Duration {
    interval.max(scanned.saturating_mul(SCAN_SHARE))
}

/// Sets the gauges; the space gauges too when `space`. Returns the time spent scanning maps.
async fn sample_once(engine: &Engine, buffer_capacity: u64, space: bool) -> Duration {
    let mut scanned = Duration::ZERO;
    gauge!("vblock_frame_cache_bytes").set(engine.frame_cache_bytes() as f64);
    gauge!("vblock_frame_cache_capacity_bytes").set(engine.frame_cache_capacity() as f64);
    gauge!("vblock_meta_cache_capacity_bytes").set(engine.meta_cache_capacity() as f64);
    let meta = engine.meta().clone();
    if let Ok(m) = tokio::task::spawn_blocking(move || meta.memory()).await {
        for (kind, bytes) in [
            ("memtables", m.memtables),
            ("table_readers", m.table_readers),
            ("block_cache", m.block_cache),
        ] {
            gauge!("vblock_meta_memory_bytes", "kind" => kind).set(bytes as f64);
        }
    }
    if let Ok(snaps) = engine.list_snapshots().await {
        gauge!("vblock_snapshots").set(snaps.len() as f64);
    }
    if let Ok(records) = engine.list_records().await {
        gauge!("vblock_volumes").set(records.len() as f64);
        for r in records {
            let v = r.volume_id.to_string();
            let sp = if space {
                let started = std::time::Instant::now();
                let sp = engine.volume_space(&r.volume_id).await.ok();
                scanned += started.elapsed();
                sp
            } else {
                None
            };
            if let Some(sp) = sp {
                gauge!("vblock_volume_allocated_bytes", "volume" => v.clone())
                    .set(sp.allocated_bytes as f64);
                gauge!("vblock_volume_stored_bytes", "volume" => v.clone())
                    .set(sp.stored_bytes as f64);
                gauge!("vblock_volume_dead_bytes", "volume" => v.clone()).set(sp.dead_bytes as f64);
                gauge!("vblock_volume_compression_ratio", "volume" => v.clone())
                    .set(sp.compression_ratio);
            }
            gauge!("vblock_volume_size_bytes", "volume" => v.clone()).set(r.size_bytes as f64);
            let attached = if r.attachments.is_empty() { 0.0 } else { 1.0 };
            gauge!("vblock_volume_attached", "volume" => v.clone()).set(attached);
            let mounted = if r.mount.is_some() { 1.0 } else { 0.0 };
            gauge!("vblock_volume_mounted", "volume" => v).set(mounted);
        }
    }
    for vol in engine.open_volumes().await {
        let v = vol.id().to_string();
        let (s, w) = (vol.stats(), vol.wal_stats());
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        gauge!("vblock_buffer_bytes", "volume" => v.clone()).set(vol.buffered_bytes() as f64);
        gauge!("vblock_buffer_capacity_bytes", "volume" => v.clone()).set(buffer_capacity as f64);
        gauge!("vblock_wal_pending_bytes", "volume" => v.clone()).set(load(&w.disk_bytes) as f64);
        gauge!("vblock_wal_segments", "volume" => v.clone()).set(load(&w.segments) as f64);
        let failed = if vol.failed().is_some() { 1.0 } else { 0.0 };
        gauge!("vblock_volume_failed", "volume" => v.clone()).set(failed);
        gauge!("vblock_wal_unwritten_bytes", "volume" => v.clone())
            .set(load(&w.unwritten_bytes) as f64);
        counter!("vblock_wal_fsyncs_total", "volume" => v.clone()).absolute(load(&w.fsyncs));
        counter!("vblock_wal_bytes_total", "volume" => v.clone()).absolute(load(&w.bytes));
        counter!("vblock_wal_backlog_waits_total", "volume" => v.clone())
            .absolute(load(&w.backlog_waits));
        counter!("vblock_chunks_uploaded_total", "volume" => v.clone()).absolute(load(&s.chunks));
        counter!("vblock_chunk_upload_bytes_total", "volume" => v.clone())
            .absolute(load(&s.chunk_bytes));
        counter!("vblock_chunks_uncompressed_total", "volume" => v.clone())
            .absolute(load(&s.uncompressed_chunks));
        counter!("vblock_cache_hits_total", "volume" => v.clone()).absolute(load(&s.frame_hits));
        counter!("vblock_cache_misses_total", "volume" => v.clone())
            .absolute(load(&s.frame_fetches));
        counter!("vblock_flush_retries_total", "volume" => v.clone())
            .absolute(load(&s.flush_retries));
        counter!("vblock_compaction_chunks_total", "volume" => v.clone())
            .absolute(load(&s.compacted_chunks));
        counter!("vblock_compaction_bytes_total", "volume" => v).absolute(load(&s.compacted_bytes));
    }
    scanned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_map_scans_take_at_most_a_twentieth_of_the_time() {
        let every = SPACE_INTERVAL;
        assert_eq!(scan_interval(every, Duration::ZERO), every);
        assert_eq!(scan_interval(every, Duration::from_millis(400)), every);
        assert_eq!(
            scan_interval(every, Duration::from_secs(3)),
            Duration::from_secs(60)
        );
    }
}
