//! WAL decoding (docs/FORMAT.md, "WAL"): the trim mark, a segment header and a sequence of
//! records, as replay reads them after a crash. Any input must give records or a clean `DecodeError`, never a panic
//! or an out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vblock::wal::record::{
    decode_record, decode_segment_header, decode_trim_mark, SEGMENT_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let _ = decode_trim_mark(data);
    let _ = decode_segment_header(data);
    let mut rest = data.get(SEGMENT_HEADER_LEN..).unwrap_or_default();
    while let Ok((header, payload)) = decode_record(rest) {
        assert_eq!(payload.len(), header.payload_len as usize);
        let len = header.record_len();
        assert!(len > 0 && len <= rest.len(), "record longer than its input");
        rest = &rest[len..];
    }
});
