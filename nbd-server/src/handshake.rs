//! Fixed newstyle handshake, server side (NBD proto.md, "Handshake", "Option types").
//!
//! Options served: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`,
//! `NBD_OPT_GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`,
//! `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT` (`base:allocation`), and `NBD_OPT_STARTTLS` when TLS is configured
//! (`NBD_REP_ERR_POLICY` when it is not; with TLS required, every other option but
//! `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD` and `NBD_OPT_EXPORT_NAME` ends the connection, as
//! proto.md's "FORCEDTLS" mode says). Anything else gets `NBD_REP_ERR_UNSUP`.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::tls::{MaybeTls, TlsConfig};
use crate::{Export, ExportProvider, MAX_BLOCK};

/// Longest option payload accepted; a longer one is treated as abuse and the client dropped.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) accepted (NBD proto.md, "Conventions": 4096).
pub const MAX_STRING: usize = 4096;

/// Errors that end a handshake (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be opened (no error reply exists).
    #[error("export {0:?} unavailable: {1}")]
    NoExport(String, crate::ExportError),
}

/// What the handshake agreed on.
pub struct Negotiated {
    /// The export chosen.
    pub export: Export,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
}

/// Transmission flags for `export` (NBD proto.md, "Transmission flags").
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    if structured {
        f |= NBD_FLAG_SEND_DF;
    }
    if export.read_only {
        f |= NBD_FLAG_READ_ONLY;
    }
    f
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&option_reply_header(option, kind, data.len() as u32));
    buf.extend_from_slice(data);
    s.write_all(&buf).await?;
    // A TLS stream holds records until flushed; for plain sockets this is a no-op.
    s.flush().await
}

async fn error_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    msg: &str,
) -> std::io::Result<()> {
    reply(s, option, kind, msg.as_bytes()).await
}

/// Reads a `u32`-length-prefixed string from `data`.
fn take_string(data: &mut &[u8]) -> Option<String> {
    if data.remaining() < 4 {
        return None;
    }
    let len = data.get_u32() as usize;
    if len > MAX_STRING || data.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&data[..len]).ok()?.to_owned();
    data.advance(len);
    Some(s)
}

/// Runs option haggling on `sock`, upgrading it to TLS on `NBD_OPT_STARTTLS` when `tls` is
/// given. Returns what was agreed and the stream to continue on; `Ok(None)`: the client aborted
/// or left.
pub async fn negotiate<S>(
    sock: S,
    provider: &dyn ExportProvider,
    tls: Option<&TlsConfig>,
) -> Result<Option<(Negotiated, MaybeTls<S>)>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = MaybeTls::Plain(sock);
    let mut s = &mut stream;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let magic = match s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::Protocol(format!(
                "option {option} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let tls_missing = tls.is_some_and(|t| t.required) && !s.is_tls();
        if tls_missing && option == NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::Protocol(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server".into(),
            ));
        }
        if tls_missing && option != NBD_OPT_STARTTLS && option != NBD_OPT_ABORT {
            error_reply(
                s,
                option,
                NBD_REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS",
            )
            .await?;
            continue;
        }
        match option {
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| HandshakeError::Protocol("export name not UTF-8".into()))?;
                let export = provider
                    .open(&name)
                    .await
                    .map_err(|e| HandshakeError::NoExport(name.clone(), e))?;
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.volume.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out).await?;
                s.flush().await?;
                return Ok(Some((
                    Negotiated {
                        export,
                        structured,
                        base_allocation,
                    },
                    stream,
                )));
            }
            NBD_OPT_ABORT => {
                // The client may already have gone; either way the session ends.
                let _ = reply(s, option, NBD_REP_ACK, &[]).await;
                return Ok(None);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    error_reply(s, option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for name in provider.list().await {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    reply(s, option, NBD_REP_SERVER, &d).await?;
                }
                reply(s, option, NBD_REP_ACK, &[]).await?;
            }
            NBD_OPT_STARTTLS => {
                let Some(tls) = tls else {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_POLICY,
                        "TLS is not configured on this server",
                    )
                    .await?;
                    continue;
                };
                if !data.is_empty() || s.is_tls() {
                    let why = if s.is_tls() {
                        "TLS is already up"
                    } else {
                        "NBD_OPT_STARTTLS takes no data"
                    };
                    error_reply(s, option, NBD_REP_ERR_INVALID, why).await?;
                    continue;
                }
                reply(s, option, NBD_REP_ACK, &[]).await?;
                let MaybeTls::Plain(plain) = stream else {
                    return Err(HandshakeError::Protocol("TLS state lost".into()));
                };
                stream = MaybeTls::Tls(Box::new(tls.accept(plain).await?));
                s = &mut stream;
                // Nothing negotiated in plaintext carries over (proto.md, "TLS support").
                structured = false;
                base_allocation = false;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let mut d = &data[..];
                let Some(name) = take_string(&mut d) else {
                    error_reply(s, option, NBD_REP_ERR_INVALID, "malformed export name").await?;
                    continue;
                };
                if d.remaining() < 2 {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_INVALID,
                        "missing information request count",
                    )
                    .await?;
                    continue;
                }
                let n = d.get_u16() as usize;
                if d.remaining() != 2 * n {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_INVALID,
                        "information requests do not match their count",
                    )
                    .await?;
                    continue;
                }
                let requests: Vec<u16> = (0..n).map(|_| d.get_u16()).collect();
                let export = match provider.open(&name).await {
                    Ok(e) => e,
                    Err(e) => {
                        error_reply(s, option, NBD_REP_ERR_UNKNOWN, &e.to_string()).await?;
                        continue;
                    }
                };
                let mut info = BytesMut::new();
                info.put_u16(NBD_INFO_EXPORT);
                info.put_u64(export.volume.size());
                info.put_u16(transmission_flags(&export, structured));
                reply(s, option, NBD_REP_INFO, &info).await?;
                if requests.contains(&NBD_INFO_NAME) {
                    let mut d = BytesMut::new();
                    d.put_u16(NBD_INFO_NAME);
                    d.put_slice(export.name.as_bytes());
                    reply(s, option, NBD_REP_INFO, &d).await?;
                }
                if requests.contains(&NBD_INFO_DESCRIPTION) {
                    let mut d = BytesMut::new();
                    d.put_u16(NBD_INFO_DESCRIPTION);
                    d.put_slice(export.description.as_bytes());
                    reply(s, option, NBD_REP_INFO, &d).await?;
                }
                // Always sent (as qemu does): any alignment works, 4 KiB is preferred.
                let mut d = BytesMut::new();
                d.put_u16(NBD_INFO_BLOCK_SIZE);
                d.put_u32(1);
                d.put_u32(4096);
                d.put_u32(MAX_BLOCK);
                reply(s, option, NBD_REP_INFO, &d).await?;
                reply(s, option, NBD_REP_ACK, &[]).await?;
                if option == NBD_OPT_GO {
                    return Ok(Some((
                        Negotiated {
                            export,
                            structured,
                            base_allocation,
                        },
                        stream,
                    )));
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(s, option, NBD_REP_ACK, &[]).await?;
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                if !structured {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let mut d = &data[..];
                let parsed = take_string(&mut d).and_then(|_export| {
                    if d.remaining() < 4 {
                        return None;
                    }
                    let n = d.get_u32();
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        queries.push(take_string(&mut d)?);
                    }
                    (d.remaining() == 0).then_some(queries)
                });
                let Some(queries) = parsed else {
                    error_reply(
                        s,
                        option,
                        NBD_REP_ERR_INVALID,
                        "malformed meta context request",
                    )
                    .await?;
                    continue;
                };
                let list = option == NBD_OPT_LIST_META_CONTEXT;
                let matches = if queries.is_empty() {
                    // LIST with no query: every context; SET with no query: none.
                    list
                } else {
                    queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
                };
                if !list {
                    base_allocation = matches;
                }
                if matches {
                    let mut d = BytesMut::new();
                    d.put_u32(if list { 0 } else { BASE_ALLOCATION_ID });
                    d.put_slice(BASE_ALLOCATION.as_bytes());
                    reply(s, option, NBD_REP_META_CONTEXT, &d).await?;
                }
                reply(s, option, NBD_REP_ACK, &[]).await?;
            }
            _ => {
                error_reply(s, option, NBD_REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}
