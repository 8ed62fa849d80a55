//! Chunk and map object decoding (docs/FORMAT.md, "Chunk object", "Map object"): whatever a
//! backend returns, decoding yields verified data or a clean error, never a panic, an
//! out-of-bounds read or an allocation the header merely claims.
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
});
