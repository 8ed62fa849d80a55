//! Transmission phase (NBD proto.md, "Transmission", "Request types").
//!
//! The reader parses each request into a typed [`Command`], validates it completely (flags,
//! range, size) and only then executes it, in its own task: requests are pipelined and replies
//! go out in completion order through one writer task that batches socket writes. In-flight work
//! per connection is bounded by a request count and a byte budget (payloads and read buffers).

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use vblock::{StatusExtent, VolumeError};

use crate::handshake::Negotiated;
use crate::proto::*;
use crate::request_metrics::ConnMetrics;
use crate::{Device, Limits, MAX_BLOCK};

/// A validated request.
#[derive(Debug)]
enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    /// Answer with this errno without touching the volume.
    Reject {
        errno: u32,
        why: &'static str,
    },
}

/// Maps an engine error to an NBD errno (NBD proto.md, "Error values").
pub fn errno(e: &VolumeError) -> u32 {
    match e {
        VolumeError::OutOfRange { .. }
        | VolumeError::TooLarge { .. }
        | VolumeError::InvalidArgument(_)
        | VolumeError::IncorrectState(_)
        | VolumeError::InUse(_) => NBD_EINVAL,
        VolumeError::ReadOnly => NBD_EPERM,
        VolumeError::Wal(w) if w.is_no_space() => NBD_ENOSPC,
        VolumeError::Closed | VolumeError::LeaseLost(_) => NBD_ESHUTDOWN,
        // A volume or snapshot deleted under its client: the device is gone.
        VolumeError::VolumeNotFound(_) | VolumeError::SnapshotNotFound(_) => NBD_EIO,
        VolumeError::Wal(_)
        | VolumeError::Meta(_)
        | VolumeError::Backend(_)
        | VolumeError::Chunk { .. }
        | VolumeError::Failed(_)
        | VolumeError::Corrupt { .. }
        | VolumeError::Io { .. }
        | VolumeError::Shipping(_)
        | VolumeError::Internal(_) => NBD_EIO,
    }
}

/// One encoded reply: a header and an optional payload.
struct Reply {
    head: Vec<u8>,
    data: Option<Bytes>,
    /// The reply carries an NBD error (metrics).
    failed: bool,
}

/// Flags a command may carry. `NBD_CMD_FLAG_FUA` is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised (always, here): proto.md, "Command flags", says the server
/// MUST accept it everywhere, ignoring it where it means nothing (read, cache, block status;
/// a flush is already durable).
fn allowed_flags(kind: u16, structured: bool) -> u16 {
    NBD_CMD_FLAG_FUA
        | match kind {
            NBD_CMD_READ if structured => NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Checks everything that can be checked before executing; the payload of a write is read by the
/// caller only when this returns `Ok`.
fn validate(h: &RequestHeader, size: u64, neg: &Negotiated) -> Result<(), (u32, &'static str)> {
    if !matches!(
        h.kind,
        NBD_CMD_READ
            | NBD_CMD_WRITE
            | NBD_CMD_FLUSH
            | NBD_CMD_TRIM
            | NBD_CMD_CACHE
            | NBD_CMD_WRITE_ZEROES
            | NBD_CMD_BLOCK_STATUS
    ) {
        return Err((NBD_EINVAL, "unknown command"));
    }
    if h.flags & !allowed_flags(h.kind, neg.structured) != 0 {
        return Err((NBD_EINVAL, "flag not valid for this command"));
    }
    let writes = matches!(h.kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if writes && neg.export.info.read_only {
        return Err((NBD_EPERM, "export is read-only"));
    }
    if h.kind == NBD_CMD_FLUSH {
        return if h.offset == 0 && h.length == 0 {
            Ok(())
        } else {
            Err((NBD_EINVAL, "flush with offset or length"))
        };
    }
    if matches!(h.kind, NBD_CMD_READ | NBD_CMD_WRITE) && h.length > MAX_BLOCK {
        return Err((NBD_EINVAL, "request larger than the maximum block size"));
    }
    if h.kind == NBD_CMD_BLOCK_STATUS {
        if !neg.base_allocation {
            return Err((NBD_EINVAL, "no metadata context selected"));
        }
        if h.length == 0 {
            return Err((NBD_EINVAL, "zero-length block status"));
        }
    }
    let end = h.offset.checked_add(u64::from(h.length));
    if end.is_none_or(|e| e > size) {
        // NBD proto.md, "Error values": writes past the end are ENOSPC, the rest EINVAL.
        return Err(if writes {
            (NBD_ENOSPC, "write beyond the end of the export")
        } else {
            (NBD_EINVAL, "request beyond the end of the export")
        });
    }
    Ok(())
}

fn error_reply(cookie: u64, structured: bool, err: u32, msg: &str) -> Reply {
    if !structured {
        return Reply {
            head: simple_reply(cookie, err).to_vec(),
            data: None,
            failed: true,
        };
    }
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut head = structured_header(
        cookie,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    head.put_u32(err);
    head.put_u16(msg.len() as u16);
    head.extend_from_slice(msg);
    Reply {
        head,
        data: None,
        failed: true,
    }
}

fn ok_reply(cookie: u64) -> Reply {
    Reply {
        head: simple_reply(cookie, 0).to_vec(),
        data: None,
        failed: false,
    }
}

/// Runs one request on the export and builds its reply (NBD proto.md, "Request types").
async fn execute(cmd: Command, cookie: u64, neg: &Negotiated) -> Reply {
    let vol = &neg.export.volume;
    let structured = neg.structured;
    let result = match cmd {
        Command::Reject { errno, why } => return error_reply(cookie, structured, errno, why),
        Command::Read { offset, len } => {
            let read = vol.read(offset, u64::from(len)).await;
            return read_reply(cookie, structured, offset, len, read, vol);
        }
        Command::Write { offset, data, fua } => vol.write(offset, data, fua).await,
        Command::Flush => vol.flush().await,
        Command::Trim { offset, len, fua } => match vol.trim(offset, u64::from(len)).await {
            Ok(()) if fua => vol.flush().await,
            r => r,
        },
        Command::WriteZeroes {
            offset,
            len,
            fua,
            fast,
        } => {
            // Whole blocks are zeroed in metadata; partial blocks need a read-modify-write,
            // which may have to fetch data: not "fast" (NBD_CMD_FLAG_FAST_ZERO).
            if fast && (offset % 4096 != 0 || u64::from(len) % 4096 != 0) {
                return error_reply(
                    cookie,
                    structured,
                    NBD_ENOTSUP,
                    "unaligned zeroing is not fast",
                );
            }
            vol.write_zeroes(offset, u64::from(len), fua).await
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match vol.block_status(offset, u64::from(len)).await {
            Ok(extents) => return block_status_reply(cookie, &extents, req_one),
            Err(e) => Err(e),
        },
        Command::Cache { offset, len } => cache(vol, offset, len).await,
    };
    match result {
        Ok(()) => ok_reply(cookie),
        Err(e) => failure_reply(cookie, structured, &e, vol),
    }
}

/// The error reply for `e` (its errno, and its text in a structured reply); I/O and space
/// errors are logged.
fn failure_reply(cookie: u64, structured: bool, e: &VolumeError, vol: &Device) -> Reply {
    let n = errno(e);
    if n == NBD_EIO || n == NBD_ENOSPC {
        tracing::warn!(volume = %vol.id(), error = %e, "request failed");
    }
    error_reply(cookie, structured, n, &e.to_string())
}

/// The reply to `NBD_CMD_READ` of `len` bytes at `offset`: one `NBD_REPLY_TYPE_OFFSET_DATA`
/// chunk (structured), or a simple reply followed by the data.
fn read_reply(
    cookie: u64,
    structured: bool,
    offset: u64,
    len: u32,
    read: Result<Bytes, VolumeError>,
    vol: &Device,
) -> Reply {
    match read {
        // An `NBD_REPLY_TYPE_OFFSET_DATA` chunk must hold at least one byte (proto.md,
        // "Structured reply types"): a zero-length read is answered with a `NONE` chunk.
        Ok(_) if structured && len == 0 => Reply {
            head: structured_header(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0).to_vec(),
            data: None,
            failed: false,
        },
        Ok(data) if structured => {
            let mut head = structured_header(
                cookie,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                8 + len,
            )
            .to_vec();
            head.put_u64(offset);
            Reply {
                head,
                data: Some(data),
                failed: false,
            }
        }
        Ok(data) => Reply {
            head: simple_reply(cookie, 0).to_vec(),
            data: Some(data),
            failed: false,
        },
        Err(e) if structured => failure_reply(cookie, structured, &e, vol),
        // A simple reply to a failed read carries no data.
        Err(e) => Reply {
            head: simple_reply(cookie, errno(&e)).to_vec(),
            data: None,
            failed: true,
        },
    }
}

/// The reply to `NBD_CMD_BLOCK_STATUS`: one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for the
/// `base:allocation` context (only the first extent with `NBD_CMD_FLAG_REQ_ONE`).
fn block_status_reply(cookie: u64, extents: &[StatusExtent], req_one: bool) -> Reply {
    let take = if req_one { 1 } else { 1 << 16 };
    let mut payload = BytesMut::new();
    payload.put_u32(BASE_ALLOCATION_ID);
    for e in extents.iter().take(take) {
        payload.put_u32(e.len as u32);
        payload.put_u32(if e.hole {
            NBD_STATE_HOLE | NBD_STATE_ZERO
        } else {
            0
        });
    }
    let mut head = structured_header(
        cookie,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        payload.len() as u32,
    )
    .to_vec();
    head.extend_from_slice(&payload);
    Reply {
        head,
        data: None,
        failed: false,
    }
}

/// `NBD_CMD_CACHE`: reads the range into the frame cache; the data itself is not needed.
async fn cache(vol: &Device, offset: u64, len: u32) -> Result<(), VolumeError> {
    let mut at = offset;
    let end = offset + u64::from(len);
    while at < end {
        let n = (end - at).min(u64::from(MAX_BLOCK));
        vol.read(at, n).await?;
        at += n;
    }
    Ok(())
}

/// Serves requests on `stream` until the client disconnects or breaks the protocol.
pub async fn transmit<S>(stream: S, neg: Negotiated, limits: Limits) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let neg = Arc::new(neg);
    let size = neg.export.volume.size();
    let metrics = Arc::new(ConnMetrics::new(neg.export.volume.id()));
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (tx, rx) = mpsc::channel::<Reply>(limits.max_requests);
    let writer = tokio::spawn(write_replies(wr, rx));
    let requests = Arc::new(Semaphore::new(limits.max_requests));
    let bytes = Arc::new(Semaphore::new(limits.max_in_flight_bytes));
    let mut tasks = JoinSet::new();
    let mut header = [0u8; REQUEST_LEN];
    // An unmount, delete or resize closes the volume: no request is taken after that; those in
    // flight are answered (`NBD_ESHUTDOWN` once they meet the closed volume), then the
    // connection is closed.
    let closed = neg.export.volume.closed();
    tokio::pin!(closed);
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let read = tokio::select! {
            read = rd.read_exact(&mut header) => read,
            () = &mut closed => {
                tracing::info!(volume = %neg.export.volume.id(), "volume closed: disconnecting its client");
                break Ok(());
            }
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Some(h) = parse_request(&header) else {
            tracing::warn!(volume = %neg.export.volume.id(), "bad request magic; disconnecting client");
            break Ok(());
        };
        if h.kind == NBD_CMD_DISC {
            break Ok(());
        }
        let Ok(slot) = requests.clone().acquire_owned().await else {
            break Ok(());
        };
        let mut budget = None;
        let cmd = match validate(&h, size, &neg) {
            Err((errno, why)) => {
                if h.kind == NBD_CMD_WRITE {
                    // Keep the stream in step: skip the payload without buffering it.
                    let skipped = tokio::io::copy(
                        &mut (&mut rd).take(u64::from(h.length)),
                        &mut tokio::io::sink(),
                    )
                    .await?;
                    if skipped != u64::from(h.length) {
                        break Ok(());
                    }
                }
                Command::Reject { errno, why }
            }
            Ok(()) => {
                if matches!(h.kind, NBD_CMD_READ | NBD_CMD_WRITE) {
                    match bytes.clone().acquire_many_owned(h.length.max(1)).await {
                        Ok(p) => budget = Some(p),
                        Err(_) => break Ok(()),
                    }
                }
                let (fua, len) = (h.flags & NBD_CMD_FLAG_FUA != 0, h.length);
                match h.kind {
                    NBD_CMD_READ => Command::Read {
                        offset: h.offset,
                        len,
                    },
                    NBD_CMD_WRITE => {
                        let mut buf = vec![0u8; len as usize];
                        rd.read_exact(&mut buf).await?;
                        Command::Write {
                            offset: h.offset,
                            data: Bytes::from(buf),
                            fua,
                        }
                    }
                    NBD_CMD_FLUSH => Command::Flush,
                    NBD_CMD_TRIM => Command::Trim {
                        offset: h.offset,
                        len,
                        fua,
                    },
                    NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
                        offset: h.offset,
                        len,
                        fua,
                        fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                    },
                    NBD_CMD_BLOCK_STATUS => Command::BlockStatus {
                        offset: h.offset,
                        len,
                        req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                    },
                    _ => Command::Cache {
                        offset: h.offset,
                        len,
                    },
                }
            }
        };
        let neg = neg.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        let started = Instant::now();
        tasks.spawn(async move {
            let reply = execute(cmd, h.cookie, &neg).await;
            metrics.record(h.kind, h.length, reply.failed, started.elapsed());
            let _ = tx.send(reply).await;
            drop(budget);
            drop(slot);
        });
    };
    // Finish what was accepted, then close.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await.unwrap_or(Ok(()));
    result.and(written)
}

/// Replies written with one vectored write per batch: at most this many replies.
const MAX_REPLY_BATCH: usize = 64;

/// Writes replies as they complete. Every reply already queued (or queued while this task yields
/// once) joins the batch, and a batch goes out in one vectored write (`writev`): payloads are not
/// copied, and an idle connection holds no write buffer.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut batch: Vec<Reply> = Vec::new();
    while let Some(r) = rx.recv().await {
        batch.push(r);
        // When the queue is empty, yield once first: requests that are about to finish (woken,
        // not yet run) then join this batch, so one `writev` carries several replies: fewer
        // system calls at high queue depths, no extra latency at QD1
        // (docs/design/reply-batches.md).
        let mut yielded = false;
        while batch.len() < MAX_REPLY_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * batch.len());
        for r in &batch {
            slices.push(IoSlice::new(&r.head));
            if let Some(d) = r.data.as_ref().filter(|d| !d.is_empty()) {
                slices.push(IoSlice::new(d));
            }
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = wr.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        // A TLS stream holds records until flushed; for plain sockets this is a no-op.
        wr.flush().await?;
        drop(slices);
        batch.clear();
    }
    wr.shutdown().await
}
