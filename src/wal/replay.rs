//! WAL replay on open: verify every record, hand the ones past the checkpoint to the engine,
//! truncate a torn tail, refuse corruption that synced records follow (as the recovery mode
//! says), and refuse a map whose checkpoint is behind what the WAL already trimmed.

use std::collections::VecDeque;
use std::path::Path;

use bytes::Bytes;

use super::record::{
    decode_record, decode_segment_header, is_padding, segment_version, DecodeError, RecordHeader,
    RecordKind, RECORD_MAGIC, SEGMENT_HEADER_LEN,
};
use super::{fsync_dir, list_segments, read_trim_mark, segment_path, WalConfig, WalError};
use super::{SegmentInfo, WalRecovery};
use crate::fs::Fs;

/// What replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Segment files read.
    pub segments: usize,
    /// Valid records read.
    pub records: u64,
    /// Records with `seq > checkpoint`, handed to the engine.
    pub applied: u64,
    /// Largest sequence number seen (0 if none).
    pub max_seq: u64,
    /// Bytes cut off a torn tail (0 if the log ended cleanly).
    pub truncated_bytes: u64,
    /// Sync notes read (records saying how far the log was synced; FORMAT.md, "Record").
    pub sync_notes: u64,
}

pub(crate) struct Replayed {
    pub report: ReplayReport,
    pub segments: VecDeque<SegmentInfo>,
    /// The trim mark found (0 without one).
    pub trimmed_through: u64,
}

struct Segment {
    no: u64,
    data: Bytes,
}

/// Replay of one WAL directory: the segments read, and what is known so far.
struct Replay<'a> {
    config: &'a WalConfig,
    volume_tag: u64,
    /// Records with `seq <= checkpoint` are in the map already.
    checkpoint: u64,
    segments: Vec<Segment>,
    report: ReplayReport,
    /// Sequence number of the last record read (0 before the first).
    last_seq: u64,
    /// Sequence number of the first write record read.
    first_seq: Option<u64>,
}

/// Replays the WAL in `config.dir` of the volume tagged `volume_tag`: every record verifies,
/// `apply` gets each one with `seq > checkpoint` in order, a torn tail is cut, and damage is
/// refused or cut as `config.recovery` says (FORMAT.md, "Replay").
///
/// Errors: [`WalError::Corrupt`] for refused damage, [`WalError::ForeignSegment`],
/// [`WalError::MapBehind`], I/O errors.
pub(crate) fn replay(
    config: &WalConfig,
    volume_tag: u64,
    checkpoint: u64,
    mut apply: impl FnMut(&RecordHeader, Bytes),
) -> Result<Replayed, WalError> {
    let dir = &config.dir;
    let trimmed_through = read_trim_mark(dir)?;
    let mut segments = Vec::new();
    for no in list_segments(dir)? {
        let path = segment_path(dir, no);
        let data = read_from_disk(&path).map_err(|e| WalError::io(&path, e))?;
        segments.push(Segment {
            no,
            data: Bytes::from(data),
        });
    }
    let mut r = Replay {
        config,
        volume_tag,
        checkpoint,
        report: ReplayReport {
            segments: segments.len(),
            ..Default::default()
        },
        segments,
        last_seq: 0,
        first_seq: None,
    };
    let mut infos = VecDeque::new();
    for i in 0..r.segments.len() {
        if !r.header_ok(i)? {
            break;
        }
        let (info, torn) = r.records(i, &mut apply)?;
        infos.push_back(info);
        if torn {
            break;
        }
    }
    if super::map_behind(checkpoint, trimmed_through, r.first_seq) {
        return Err(WalError::MapBehind {
            dir: dir.to_owned(),
            checkpoint,
            trimmed_through,
            first: r.first_seq,
        });
    }
    r.report.max_seq = r.last_seq;
    Ok(Replayed {
        report: r.report,
        segments: infos,
        trimmed_through,
    })
}

impl Replay<'_> {
    /// Whether segment `i`'s header verifies; a damaged one is refused (error) or cut with
    /// every later segment (`false`).
    fn header_ok(&mut self, i: usize) -> Result<bool, WalError> {
        let seg = &self.segments[i];
        match decode_segment_header(&seg.data) {
            Ok((_, tag)) if tag != self.volume_tag => Err(WalError::ForeignSegment {
                path: segment_path(&self.config.dir, seg.no),
                found: tag,
                expected: self.volume_tag,
            }),
            Ok(_) => Ok(true),
            Err(reason) => {
                self.damaged(i, 0, reason)?;
                Ok(false)
            }
        }
    }

    /// Reads segment `i`'s records, applying those past the checkpoint. Returns what the writer
    /// needs to know of the segment, and whether it ended in damage that was cut (replay stops
    /// there).
    fn records(
        &mut self,
        i: usize,
        apply: &mut impl FnMut(&RecordHeader, Bytes),
    ) -> Result<(SegmentInfo, bool), WalError> {
        let data = self.segments[i].data.clone();
        let mut info = SegmentInfo {
            no: self.segments[i].no,
            max_seq: 0,
            bytes: 0,
        };
        let padded = segment_version(&data) >= 2;
        let mut off = SEGMENT_HEADER_LEN;
        let mut torn = false;
        while off < data.len() {
            match decode_record(&data[off..]) {
                Ok((h, _)) if h.kind == RecordKind::SyncNote && h.volume_tag == self.volume_tag => {
                    // Not a write: only evidence of what was synced, read again on a bad record.
                    self.report.sync_notes += 1;
                    off += h.record_len();
                }
                Ok((h, _)) if h.volume_tag != self.volume_tag || h.seq <= self.last_seq => {
                    let reason = if h.volume_tag != self.volume_tag {
                        DecodeError::BadMagic(RECORD_MAGIC)
                    } else {
                        DecodeError::BadLength {
                            block_count: h.block_count,
                            payload_len: h.payload_len,
                        }
                    };
                    return Err(WalError::Corrupt {
                        path: segment_path(&self.config.dir, info.no),
                        offset: off as u64,
                        reason,
                    });
                }
                Ok((h, _)) => {
                    let start = off + super::record::RECORD_HEADER_LEN;
                    let payload = data.slice(start..start + h.payload_len as usize);
                    self.report.records += 1;
                    self.first_seq.get_or_insert(h.seq);
                    self.last_seq = h.seq;
                    info.max_seq = h.seq;
                    if h.seq > self.checkpoint {
                        self.report.applied += 1;
                        apply(&h, payload);
                    }
                    off += h.record_len();
                }
                Err(_) if padded && is_padding(&data[off..]) => {
                    // The zero padding of a version 2 segment: its records end here.
                    break;
                }
                Err(reason) => {
                    self.damaged(i, off, reason)?;
                    torn = true;
                    break;
                }
            }
        }
        info.bytes = off.min(data.len()) as u64;
        Ok((info, torn))
    }

    /// A record (or, at `off` 0, the header) of segment `i` that does not verify: refused as
    /// [`WalError::Corrupt`] when the recovery mode says so, else cut with everything after it
    /// (logged as a torn tail, or as an error when synced records were dropped).
    fn damaged(&mut self, i: usize, off: usize, reason: DecodeError) -> Result<(), WalError> {
        let mode = self.config.recovery;
        let path = segment_path(&self.config.dir, self.segments[i].no);
        let (refused, synced) =
            refuse(mode, &self.segments, i, off, self.last_seq, self.volume_tag);
        if refused {
            return Err(WalError::Corrupt {
                path,
                offset: off as u64,
                reason,
            });
        }
        let cut = cut_tail(&self.config.fs, &self.config.dir, &self.segments, i, off)?;
        if off == 0 {
            if synced {
                tracing::error!(path = %path.display(), bytes = cut, %reason, mode = mode.name(), "WAL segment header corrupt: segment and later ones deleted, synced records among them dropped");
            }
        } else if synced {
            tracing::error!(
                path = %path.display(),
                offset = off,
                bytes = cut,
                %reason,
                mode = mode.name(),
                "WAL corrupt: cut at the bad record, synced records after it dropped"
            );
        } else {
            tracing::warn!(
                path = %path.display(),
                offset = off,
                bytes = cut,
                %reason,
                "WAL tail torn: truncated"
            );
        }
        self.report.truncated_bytes += cut;
        Ok(())
    }
}

/// Whether a bad record at byte `off` of segment `i` refuses the open under `mode`, and whether
/// the WAL recorded that something at or after it was synced ([`hides_synced_records`]).
fn refuse(
    mode: WalRecovery,
    segments: &[Segment],
    i: usize,
    off: usize,
    last_seq: u64,
    volume_tag: u64,
) -> (bool, bool) {
    let synced = hides_synced_records(segments, i, off, last_seq, volume_tag);
    let refuse = match mode {
        WalRecovery::TolerateTailCorruption => synced,
        WalRecovery::AbsoluteConsistency => {
            valid_record_follows(segments, i, off + 1, last_seq, volume_tag)
        }
        WalRecovery::TolerateAnyCorruption => false,
    };
    (refuse, synced)
}

/// Reads a segment, first dropping its clean cached pages (`posix_fadvise(DONTNEED)`): after a
/// failed writeback Linux may keep pages marked clean whose bytes never reached the disk, and
/// replay must see what the disk holds. Dirty pages stay (their writeback is still to come).
fn read_from_disk(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut data)?;
    Ok(data)
}

/// True when a record that verifies, belongs to this volume and continues the sequence exists
/// anywhere after byte `from` of segment `i` (or in a later segment). Only then is a bad record
/// "in the middle"; otherwise it is a torn tail.
fn valid_record_follows(
    segments: &[Segment],
    i: usize,
    from: usize,
    last_seq: u64,
    volume_tag: u64,
) -> bool {
    segments[i..].iter().enumerate().any(|(k, seg)| {
        let start = if k == 0 { from } else { 0 };
        next_valid_record(&seg.data, start, last_seq, volume_tag).is_some()
    })
}

/// Offset of the first record at or after `from` in `data` that verifies, belongs to this volume
/// and continues the sequence (a data record above `last_seq`, or a sync note).
fn next_valid_record(data: &[u8], from: usize, last_seq: u64, volume_tag: u64) -> Option<usize> {
    valid_records(data, from, volume_tag)
        .find(|h| h.1.kind == RecordKind::SyncNote || h.1.seq > last_seq)
        .map(|(at, _)| at)
}

/// Every record at or after byte `from` of `data` that verifies and belongs to this volume, with
/// its offset, found by scanning for the record magic at every byte.
fn valid_records(
    data: &[u8],
    from: usize,
    volume_tag: u64,
) -> impl Iterator<Item = (usize, RecordHeader)> + '_ {
    let magic = RECORD_MAGIC.to_le_bytes();
    (from..data.len().saturating_sub(3)).filter_map(move |p| {
        if data[p..p + 4] != magic {
            return None;
        }
        match decode_record(&data[p..]) {
            Ok((h, _)) if h.volume_tag == volume_tag => Some((p, h)),
            _ => None,
        }
    })
}

/// True when the WAL recorded that something at or after the bad record at byte `off` of
/// segment `i` was synced, so cutting there would drop acknowledged writes (FORMAT.md, "WAL
/// replay"): a valid record follows in a later segment (a segment is synced whole before the next
/// one is written, and replayed segments are synced before new records go to a new one), or a
/// sync note later in this segment covers a sequence number above `last_seq`, the last good
/// record's (every record at or after `off` has a higher one).
fn hides_synced_records(
    segments: &[Segment],
    i: usize,
    off: usize,
    last_seq: u64,
    volume_tag: u64,
) -> bool {
    if valid_record_follows(segments, i + 1, 0, last_seq, volume_tag) {
        return true;
    }
    valid_records(&segments[i].data, off + 1, volume_tag)
        .any(|(_, h)| h.kind == RecordKind::SyncNote && h.seq > last_seq)
}

/// Cuts segment `i` at `at` (deleting it when `at` is inside its header) and deletes every later
/// segment; returns the bytes removed.
fn cut_tail(
    fs: &Fs,
    dir: &Path,
    segments: &[Segment],
    i: usize,
    at: usize,
) -> Result<u64, WalError> {
    let mut removed = 0u64;
    for (k, seg) in segments[i..].iter().enumerate() {
        let path = segment_path(dir, seg.no);
        if k == 0 && at >= SEGMENT_HEADER_LEN {
            removed += (seg.data.len() - at) as u64;
            let file = fs.open_write(&path).map_err(|e| WalError::io(&path, e))?;
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| WalError::io(&path, e))?;
        } else {
            removed += seg.data.len() as u64;
            fs.remove_file(&path).map_err(|e| WalError::io(&path, e))?;
        }
    }
    fsync_dir(fs, dir)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{encode_segment_header, one_block_record, RECORD_HEADER_LEN};

    const TAG: u64 = 0x5eed;

    fn config(dir: &Path, recovery: WalRecovery) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            segment_bytes: 64 << 20,
            name: "test".into(),
            recovery,
            fs: Fs::Real,
        }
    }

    fn record(seq: u64, fill: u8) -> (RecordHeader, Vec<u8>) {
        one_block_record(TAG, seq, fill)
    }

    /// Replay of a segment cut at every byte offset of its last record (header and payload)
    /// yields exactly the records before it and cuts the torn bytes off the file.
    #[test]
    fn torn_tail_at_every_byte_of_the_last_record() {
        let mut full = encode_segment_header(1, TAG).to_vec();
        for (seq, fill) in [(1, 0xa1), (2, 0xb2), (3, 0xc3)] {
            let (h, p) = record(seq, fill);
            full.extend_from_slice(&h.encode(&p));
            full.extend_from_slice(&p);
        }
        let last = full.len() - (RECORD_HEADER_LEN + 4096);
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = segment_path(dir.path(), 1);
        for cut in last..full.len() {
            std::fs::write(&seg, &full[..cut]).expect("write segment");
            let mut applied = Vec::new();
            let cfg = config(dir.path(), WalRecovery::default());
            let replayed = replay(&cfg, TAG, 0, |h, p| applied.push((h.seq, p)))
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let seqs: Vec<u64> = applied.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, [1, 2], "cut at {cut}");
            assert!(applied[0].1.iter().all(|&b| b == 0xa1), "cut at {cut}");
            assert!(applied[1].1.iter().all(|&b| b == 0xb2), "cut at {cut}");
            assert_eq!(
                replayed.report.truncated_bytes,
                (cut - last) as u64,
                "cut at {cut}"
            );
            let len = std::fs::metadata(&seg).expect("stat").len();
            assert_eq!(
                len, last as u64,
                "cut at {cut}: torn bytes left in the file"
            );
        }
    }

    /// A version 2 segment: header and records 1..=3 (one block each), zero padding up to
    /// 64 KiB. Returns the bytes and the offset of each record.
    fn padded_segment(no: u64) -> (Vec<u8>, Vec<usize>) {
        segment(no, 3, 0)
    }

    /// A version 2 segment `no`: header, one-block records 1..=`records`, with a sync note saying
    /// `noted` is synced before record 3 (none for 0), zero padding to 64 KiB. Returns the bytes
    /// and each data record's offset.
    fn segment(no: u64, records: u64, noted: u64) -> (Vec<u8>, Vec<usize>) {
        let mut seg = encode_segment_header(no, TAG).to_vec();
        let mut offsets = Vec::new();
        for seq in 1..=records {
            if seq == 3 && noted > 0 {
                seg.extend_from_slice(&RecordHeader::sync_note(TAG, noted).encode(&[]));
            }
            offsets.push(seg.len());
            let (h, p) = record(seq, 0x10 + seq as u8);
            seg.extend_from_slice(&h.encode(&p));
            seg.extend_from_slice(&p);
        }
        seg.resize(64 << 10, 0);
        (seg, offsets)
    }

    fn replay_seqs(dir: &Path) -> Result<(Vec<u64>, ReplayReport), WalError> {
        replay_mode(dir, WalRecovery::default())
    }

    fn replay_mode(dir: &Path, mode: WalRecovery) -> Result<(Vec<u64>, ReplayReport), WalError> {
        let mut seqs = Vec::new();
        let replayed = replay(&config(dir, mode), TAG, 0, |h, _| seqs.push(h.seq))?;
        Ok((seqs, replayed.report))
    }

    /// Zero padding after a version 2 segment's last record ends that segment cleanly: nothing
    /// is cut, and the next segment's records follow.
    #[test]
    fn padding_ends_a_segment_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (seg, _) = padded_segment(1);
        std::fs::write(segment_path(dir.path(), 1), &seg).expect("write");
        let mut next = encode_segment_header(2, TAG).to_vec();
        let (h, p) = record(4, 0x44);
        next.extend_from_slice(&h.encode(&p));
        next.extend_from_slice(&p);
        next.resize(16 << 10, 0);
        std::fs::write(segment_path(dir.path(), 2), &next).expect("write");
        let (seqs, report) = replay_seqs(dir.path()).expect("replay");
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 1))
                .expect("stat")
                .len(),
            64 << 10,
            "padding is not a torn tail"
        );
    }

    /// Records 1 and 2, a sync note saying `noted` is synced (none for 0), records 3 and 4.
    fn noted_segment(noted: u64) -> (Vec<u8>, Vec<usize>) {
        segment(1, 4, noted)
    }

    /// Damage to a record that a later sync note covers is corruption: it refuses the open in
    /// every mode but `TolerateAnyCorruption`, which cuts there. Damage no note covers (a torn
    /// write of a batch never synced, whatever its bytes: flipped bits or zero sectors) is a torn
    /// tail in the default mode, and refused under `AbsoluteConsistency` when valid records follow.
    #[test]
    fn sync_notes_tell_damage_from_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment_path(dir.path(), 1);
        let damage = |seg: &mut Vec<u8>, at: usize, zeros: bool| {
            let p = at + RECORD_HEADER_LEN + 1024;
            if zeros {
                // A whole zero sector inside the payload: what the old rule took for a torn write.
                let s = p.next_multiple_of(512);
                seg[s..s + 512].fill(0);
            } else {
                seg[p] ^= 0x20;
            }
        };
        for zeros in [false, true] {
            // Record 2 damaged; the note after it says 2 was synced.
            let (mut seg, offsets) = noted_segment(2);
            damage(&mut seg, offsets[1], zeros);
            std::fs::write(&path, &seg).expect("write");
            for mode in [
                WalRecovery::TolerateTailCorruption,
                WalRecovery::AbsoluteConsistency,
            ] {
                assert!(
                    matches!(replay_mode(dir.path(), mode), Err(WalError::Corrupt { offset, .. }) if offset == offsets[1] as u64),
                    "{mode:?} zeros={zeros}: a synced record's damage refuses the open"
                );
            }
            assert_eq!(
                std::fs::read(&path).expect("read"),
                seg,
                "a refused open changes nothing"
            );
            let (seqs, report) =
                replay_mode(dir.path(), WalRecovery::TolerateAnyCorruption).expect("cut");
            assert_eq!(seqs, [1]);
            assert_eq!(report.truncated_bytes, (seg.len() - offsets[1]) as u64);

            // Record 3 damaged; the note before it covers only 1 and 2: a torn tail.
            let (mut seg, offsets) = noted_segment(2);
            damage(&mut seg, offsets[2], zeros);
            std::fs::write(&path, &seg).expect("write");
            assert!(matches!(
                replay_mode(dir.path(), WalRecovery::AbsoluteConsistency),
                Err(WalError::Corrupt { .. })
            ));
            let (seqs, report) = replay_seqs(dir.path()).expect("a torn tail is not corruption");
            assert_eq!(seqs, [1, 2]);
            assert_eq!(report.sync_notes, 1);
            assert_eq!(
                std::fs::metadata(&path).expect("stat").len(),
                offsets[2] as u64,
                "cut at the damaged record"
            );

            // No note at all: nothing says record 2 was synced.
            let (mut seg, offsets) = noted_segment(0);
            damage(&mut seg, offsets[1], zeros);
            std::fs::write(&path, &seg).expect("write");
            let (seqs, _) = replay_seqs(dir.path()).expect("torn");
            assert_eq!(seqs, [1]);
        }

        // A bad record with valid records in a later segment is corruption: a segment is synced
        // whole before the next one is written.
        let (mut seg, offsets) = noted_segment(0);
        damage(&mut seg, offsets[2], false);
        std::fs::write(&path, &seg).expect("write");
        let mut next = encode_segment_header(2, TAG).to_vec();
        let (h, p) = record(5, 0x44);
        next.extend_from_slice(&h.encode(&p));
        next.extend_from_slice(&p);
        std::fs::write(segment_path(dir.path(), 2), &next).expect("write");
        assert!(matches!(
            replay_seqs(dir.path()),
            Err(WalError::Corrupt { .. })
        ));
    }

    /// A checkpoint behind the trim mark replays when the WAL still starts at or before
    /// checkpoint + 1, and is refused when records in between are gone (or no record is left).
    #[test]
    fn checkpoint_behind_the_trim_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_segment = |no: u64, seqs: std::ops::RangeInclusive<u64>| {
            let mut seg = encode_segment_header(no, TAG).to_vec();
            for seq in seqs {
                let (h, p) = record(seq, seq as u8);
                seg.extend_from_slice(&h.encode(&p));
                seg.extend_from_slice(&p);
            }
            std::fs::write(segment_path(dir.path(), no), seg).expect("write segment");
        };
        crate::wal::write_trim_mark(&Fs::Real, dir.path(), 5).expect("mark");
        let seqs = |checkpoint| {
            let mut applied = Vec::new();
            let cfg = config(dir.path(), WalRecovery::default());
            replay(&cfg, TAG, checkpoint, |h, _| applied.push(h.seq)).map(|_| applied)
        };
        // No records at all: only a map at or past the mark is whole.
        assert_eq!(seqs(5).expect("at the mark"), Vec::<u64>::new());
        assert!(matches!(seqs(4), Err(WalError::MapBehind { .. })));
        // The WAL kept 4..=8: a map at 3 is behind the mark but loses nothing.
        write_segment(2, 4..=8);
        assert_eq!(seqs(3).expect("whole"), vec![4, 5, 6, 7, 8]);
        assert!(matches!(seqs(2), Err(WalError::MapBehind { .. })));
    }
}
