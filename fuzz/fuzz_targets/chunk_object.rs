//! Chunk, map and shipped WAL object decoding (docs/FORMAT.md, "Chunk object", "Map object",
//! "Shipped WAL object"): whatever a backend returns, decoding yields verified data or a clean
//! error, never a panic, an out-of-bounds read or an allocation the header merely claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, index)) = vblock::chunk::verify(data) {
        for e in &index {
            assert!(e.frame_offset as usize + e.frame_len as usize <= data.len());
        }
    }
    let _ = vblock::chunk::decode_index(data, data.len() as u64);
    let _ = vblock::mapobj::MapObject::decode(data);
    // A shipped WAL object under the counter its header names (else only the header check runs).
    let counter = data
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let _ = vblock::cluster::walobj::decode_header(data, counter);
    if let Ok((h, records)) =
        vblock::cluster::walobj::decode(&bytes::Bytes::copy_from_slice(data), counter)
    {
        assert_eq!(records.len(), h.record_count as usize);
        assert!(records.windows(2).all(|w| w[0].0.seq < w[1].0.seq));
    }
});
