//! WAL replay on open: verify every record, hand the ones past the checkpoint to the engine,
//! truncate a torn tail, refuse corruption that valid records follow, and refuse a map whose
//! checkpoint is behind what the WAL already trimmed.

use std::collections::VecDeque;
use std::path::Path;

use bytes::Bytes;

use super::record::{
    decode_record, decode_segment_header, DecodeError, RecordHeader, RECORD_MAGIC,
    SEGMENT_HEADER_LEN,
};
use super::writer::SegmentInfo;
use super::{fsync_dir, list_segments, read_trim_mark, segment_path, WalError};

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

pub(crate) fn replay(
    dir: &Path,
    volume_tag: u64,
    checkpoint: u64,
    mut apply: impl FnMut(&RecordHeader, Bytes),
) -> Result<Replayed, WalError> {
    let trimmed_through = read_trim_mark(dir)?;
    let mut segments = Vec::new();
    for no in list_segments(dir)? {
        let path = segment_path(dir, no);
        let data = std::fs::read(&path).map_err(|e| WalError::io(&path, e))?;
        segments.push(Segment {
            no,
            data: Bytes::from(data),
        });
    }
    let mut report = ReplayReport {
        segments: segments.len(),
        ..Default::default()
    };
    let mut infos = VecDeque::new();
    let mut last_seq = 0u64;
    let mut first_seq = None;
    for i in 0..segments.len() {
        let seg = &segments[i];
        let path = segment_path(dir, seg.no);
        match decode_segment_header(&seg.data) {
            Ok((_, tag)) if tag != volume_tag => {
                return Err(WalError::ForeignSegment {
                    path,
                    found: tag,
                    expected: volume_tag,
                })
            }
            Ok(_) => {}
            Err(reason) => {
                if valid_record_follows(&segments, i, 0, last_seq, volume_tag) {
                    return Err(WalError::Corrupt {
                        path,
                        offset: 0,
                        reason,
                    });
                }
                report.truncated_bytes += cut_tail(dir, &segments, i, 0)?;
                break;
            }
        }
        let mut info = SegmentInfo {
            no: seg.no,
            max_seq: 0,
            bytes: 0,
        };
        let mut off = SEGMENT_HEADER_LEN;
        let mut torn = false;
        while off < seg.data.len() {
            match decode_record(&seg.data[off..]) {
                Ok((h, _)) if h.volume_tag != volume_tag || h.seq <= last_seq => {
                    let reason = if h.volume_tag != volume_tag {
                        DecodeError::BadMagic(RECORD_MAGIC)
                    } else {
                        DecodeError::BadLength {
                            block_count: h.block_count,
                            payload_len: h.payload_len,
                        }
                    };
                    return Err(WalError::Corrupt {
                        path,
                        offset: off as u64,
                        reason,
                    });
                }
                Ok((h, _)) => {
                    let start = off + super::record::RECORD_HEADER_LEN;
                    let payload = seg.data.slice(start..start + h.payload_len as usize);
                    report.records += 1;
                    first_seq.get_or_insert(h.seq);
                    last_seq = h.seq;
                    info.max_seq = h.seq;
                    if h.seq > checkpoint {
                        report.applied += 1;
                        apply(&h, payload);
                    }
                    off += h.record_len();
                }
                Err(reason) => {
                    if valid_record_follows(&segments, i, off + 1, last_seq, volume_tag) {
                        return Err(WalError::Corrupt {
                            path,
                            offset: off as u64,
                            reason,
                        });
                    }
                    let cut = cut_tail(dir, &segments, i, off)?;
                    tracing::warn!(
                        path = %path.display(),
                        offset = off,
                        bytes = cut,
                        %reason,
                        "WAL tail torn: truncated"
                    );
                    report.truncated_bytes += cut;
                    torn = true;
                    break;
                }
            }
        }
        info.bytes = off.min(seg.data.len()) as u64;
        infos.push_back(info);
        if torn {
            break;
        }
    }
    if super::map_behind(checkpoint, trimmed_through, first_seq) {
        return Err(WalError::MapBehind {
            dir: dir.to_owned(),
            checkpoint,
            trimmed_through,
            first: first_seq.map_or_else(|| "none".to_owned(), |f| f.to_string()),
        });
    }
    report.max_seq = last_seq;
    Ok(Replayed {
        report,
        segments: infos,
        trimmed_through,
    })
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
    let magic = RECORD_MAGIC.to_le_bytes();
    segments[i..].iter().enumerate().any(|(k, seg)| {
        let start = if k == 0 { from } else { 0 };
        let data = &seg.data[..];
        (start..data.len().saturating_sub(3)).any(|p| {
            data[p..p + 4] == magic
                && matches!(decode_record(&data[p..]),
                    Ok((h, _)) if h.volume_tag == volume_tag && h.seq > last_seq)
        })
    })
}

/// Cuts segment `i` at `at` (deleting it when `at` is inside its header) and deletes every later
/// segment; returns the bytes removed.
fn cut_tail(dir: &Path, segments: &[Segment], i: usize, at: usize) -> Result<u64, WalError> {
    let mut removed = 0u64;
    for (k, seg) in segments[i..].iter().enumerate() {
        let path = segment_path(dir, seg.no);
        if k == 0 && at >= SEGMENT_HEADER_LEN {
            removed += (seg.data.len() - at) as u64;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| WalError::io(&path, e))?;
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| WalError::io(&path, e))?;
        } else {
            removed += seg.data.len() as u64;
            std::fs::remove_file(&path).map_err(|e| WalError::io(&path, e))?;
        }
    }
    fsync_dir(dir)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{encode_segment_header, one_block_record, RECORD_HEADER_LEN};

    const TAG: u64 = 0x5eed;

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
            let replayed = replay(dir.path(), TAG, 0, |h, p| applied.push((h.seq, p)))
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
        crate::wal::write_trim_mark(dir.path(), 5).expect("mark");
        let seqs = |checkpoint| {
            let mut applied = Vec::new();
            replay(dir.path(), TAG, checkpoint, |h, _| applied.push(h.seq)).map(|_| applied)
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
