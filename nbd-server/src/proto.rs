//! Constants and wire structures of the NBD protocol, named as in the NBD project's
//! `doc/proto.md` (sections "Handshake", "Transmission", "Values"). All integers on the wire are
//! big-endian (network byte order).

/// `NBDMAGIC`, first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply (fixed newstyle).
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` supported (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flushes and FUA on one connection cover writes completed on every connection.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Start TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Export information, stay in negotiation.
pub const NBD_OPT_INFO: u32 = 6;
/// Export information, then transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
/// An export in reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// Information in reply to `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// A metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Syntactically invalid.
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// The server requires TLS first (`NBD_OPT_STARTTLS`).
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Server shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

/// `NBD_REP_INFO` types.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const NBD_CMD_READ: u16 = 0;
/// Write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Trim.
pub const NBD_CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes: do not punch holes.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read: do not fragment the reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail fast if zeroing would be slow.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply types.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errors.
pub const NBD_EPERM: u32 = 1;
/// I/O error.
pub const NBD_EIO: u32 = 5;
/// Out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// `base:allocation` flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// The metadata context vblock serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id vblock assigns to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Request header length in bytes.
pub const REQUEST_LEN: usize = 28;

/// A parsed request header (NBD proto.md, "Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (payload length for writes).
    pub length: u32,
}

/// Parses a request header; `None` when the magic is wrong (a protocol violation).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != NBD_REQUEST_MAGIC {
        return None;
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&b[8..16]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&b[16..24]);
    Some(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(cookie),
        offset: u64::from_be_bytes(offset),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// Encodes a simple reply header (16 bytes).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Encodes a structured reply chunk header (20 bytes).
pub fn structured_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}

/// Encodes an option reply header (20 bytes).
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&option.to_be_bytes());
    h[12..16].copy_from_slice(&reply.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&NBD_CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            RequestHeader {
                flags: NBD_CMD_FLAG_FUA,
                kind: NBD_CMD_WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        b[0] ^= 1;
        assert_eq!(parse_request(&b), None);
    }
}
