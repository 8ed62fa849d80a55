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
use vblock::records::split_export_name;

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

/// Transmission flags for an export, `read_only` or not (NBD proto.md, "Transmission flags").
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
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
    if read_only {
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

/// What handling one option leads to.
enum Step {
    /// Answered; the next option follows.
    Next,
    /// Refuse the option with error reply `kind` and this text; the next option follows.
    Refuse(u32, &'static str),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake runs now.
    StartTls,
    /// Transmission starts with this export (boxed: an export is large beside the others).
    Transmit(Box<Export>),
    /// The client ended the handshake (`NBD_OPT_ABORT`).
    End,
}

/// The state of option haggling: what the client asked for so far.
struct Haggle<'a> {
    provider: &'a dyn ExportProvider,
    tls: Option<&'a TlsConfig>,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    base_allocation: bool,
}

/// Sends the server's greeting and reads the client's flags; returns whether the client set
/// `NBD_FLAG_C_NO_ZEROES` (proto.md, "Fixed newstyle negotiation").
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, HandshakeError> {
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
    Ok(client_flags & NBD_FLAG_C_NO_ZEROES != 0)
}

/// Reads the next option: its code and data (at most [`MAX_OPTION_LEN`] bytes). `None` when
/// the client closed the connection between options.
async fn read_option<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Option<(u32, Vec<u8>)>, HandshakeError> {
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
    Ok(Some((option, data)))
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
    let mut h = Haggle {
        provider,
        tls,
        no_zeroes: greet(&mut stream).await?,
        structured: false,
        base_allocation: false,
    };
    loop {
        let Some((option, data)) = read_option(&mut stream).await? else {
            return Ok(None);
        };
        match h.option(&mut stream, option, data).await? {
            Step::Next => {}
            Step::Refuse(kind, why) => error_reply(&mut stream, option, kind, why).await?,
            Step::StartTls => {
                let (MaybeTls::Plain(plain), Some(tls)) = (stream, tls) else {
                    return Err(HandshakeError::Protocol("TLS state lost".into()));
                };
                stream = MaybeTls::Tls(Box::new(tls.accept(plain).await?));
                // Nothing negotiated in plaintext carries over (proto.md, "TLS support").
                h.structured = false;
                h.base_allocation = false;
            }
            Step::Transmit(export) => {
                let agreed = Negotiated {
                    export: *export,
                    structured: h.structured,
                    base_allocation: h.base_allocation,
                };
                return Ok(Some((agreed, stream)));
            }
            Step::End => return Ok(None),
        }
    }
}

impl Haggle<'_> {
    /// Handles option `option` with payload `data`, answering on `s` (error replies are left to
    /// the caller, through [`Step::Refuse`]).
    async fn option<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut MaybeTls<S>,
        option: u32,
        data: Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let tls_missing = self.tls.is_some_and(|t| t.required) && !s.is_tls();
        if tls_missing && option == NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::Protocol(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server".into(),
            ));
        }
        if tls_missing && option != NBD_OPT_STARTTLS && option != NBD_OPT_ABORT {
            return Ok(Step::Refuse(
                NBD_REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS",
            ));
        }
        match option {
            NBD_OPT_EXPORT_NAME => self.export_name(s, data).await,
            NBD_OPT_ABORT => {
                // The client may already have gone; either way the handshake ends.
                let _ = reply(s, option, NBD_REP_ACK, &[]).await;
                Ok(Step::End)
            }
            NBD_OPT_LIST => self.list(s, &data).await,
            NBD_OPT_STARTTLS => self.start_tls(s, &data).await,
            NBD_OPT_INFO | NBD_OPT_GO => self.info(s, option, &data).await,
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return Ok(Step::Refuse(
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    ));
                }
                self.structured = true;
                reply(s, option, NBD_REP_ACK, &[]).await?;
                Ok(Step::Next)
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(s, option, &data).await
            }
            _ => Ok(Step::Refuse(NBD_REP_ERR_UNSUP, "option not supported")),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: the export's size and flags, then transmission. It has no error
    /// reply: an export that cannot be opened ends the connection.
    async fn export_name<S: AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        data: Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let name = String::from_utf8(data)
            .map_err(|_| HandshakeError::Protocol("export name not UTF-8".into()))?;
        let export = self
            .provider
            .open(&name)
            .await
            .map_err(|e| HandshakeError::NoExport(split_export_name(&name).0.to_owned(), e))?;
        let mut out = Vec::with_capacity(10 + 124);
        out.extend_from_slice(&export.volume.size().to_be_bytes());
        out.extend_from_slice(
            &transmission_flags(export.info.read_only, self.structured).to_be_bytes(),
        );
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        s.write_all(&out).await?;
        s.flush().await?;
        Ok(Step::Transmit(Box::new(export)))
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export name.
    async fn list<S: AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        if !data.is_empty() {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            ));
        }
        for name in self.provider.list().await {
            let mut d = Vec::with_capacity(4 + name.len());
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            reply(s, NBD_OPT_LIST, NBD_REP_SERVER, &d).await?;
        }
        reply(s, NBD_OPT_LIST, NBD_REP_ACK, &[]).await?;
        Ok(Step::Next)
    }

    /// `NBD_OPT_STARTTLS`: acknowledged when TLS is configured and not up yet.
    async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut MaybeTls<S>,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        if self.tls.is_none() {
            return Ok(Step::Refuse(
                NBD_REP_ERR_POLICY,
                "TLS is not configured on this server",
            ));
        }
        if s.is_tls() {
            return Ok(Step::Refuse(NBD_REP_ERR_INVALID, "TLS is already up"));
        }
        if !data.is_empty() {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            ));
        }
        reply(s, NBD_OPT_STARTTLS, NBD_REP_ACK, &[]).await?;
        Ok(Step::StartTls)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's information replies (`NBD_INFO_EXPORT`,
    /// `NBD_INFO_BLOCK_SIZE` always; `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` on request),
    /// then for GO transmission.
    async fn info<S: AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        let mut d = data;
        let Some(name) = take_string(&mut d) else {
            return Ok(Step::Refuse(NBD_REP_ERR_INVALID, "malformed export name"));
        };
        if d.remaining() < 2 {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "missing information request count",
            ));
        }
        let n = d.get_u16() as usize;
        if d.remaining() != 2 * n {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "information requests do not match their count",
            ));
        }
        let requests: Vec<u16> = (0..n).map(|_| d.get_u16()).collect();
        // INFO only describes: no volume instance is opened for it.
        let found = if option == NBD_OPT_GO {
            self.provider
                .open(&name)
                .await
                .map(|e| (e.info.clone(), Some(e)))
        } else {
            self.provider.describe(&name).await.map(|i| (i, None))
        };
        let (about, export) = match found {
            Ok(f) => f,
            Err(e) => {
                // The error's own text, which a `Step::Refuse` cannot carry.
                error_reply(s, option, NBD_REP_ERR_UNKNOWN, &e.to_string()).await?;
                return Ok(Step::Next);
            }
        };
        let mut info = BytesMut::new();
        info.put_u16(NBD_INFO_EXPORT);
        info.put_u64(about.size);
        info.put_u16(transmission_flags(about.read_only, self.structured));
        reply(s, option, NBD_REP_INFO, &info).await?;
        if requests.contains(&NBD_INFO_NAME) {
            let mut d = BytesMut::new();
            d.put_u16(NBD_INFO_NAME);
            d.put_slice(about.name.as_bytes());
            reply(s, option, NBD_REP_INFO, &d).await?;
        }
        if requests.contains(&NBD_INFO_DESCRIPTION) {
            let mut d = BytesMut::new();
            d.put_u16(NBD_INFO_DESCRIPTION);
            d.put_slice(about.description.as_bytes());
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
        Ok(match export {
            Some(export) => Step::Transmit(Box::new(export)),
            None => Step::Next,
        })
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the one context served is
    /// `base:allocation`; SET selects it (or nothing) for transmission.
    async fn meta_context<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        if !self.structured {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "negotiate structured replies first",
            ));
        }
        let Some(queries) = meta_context_queries(data) else {
            return Ok(Step::Refuse(
                NBD_REP_ERR_INVALID,
                "malformed meta context request",
            ));
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
            self.base_allocation = matches;
        }
        if matches {
            let mut d = BytesMut::new();
            d.put_u32(if list { 0 } else { BASE_ALLOCATION_ID });
            d.put_slice(BASE_ALLOCATION.as_bytes());
            reply(s, option, NBD_REP_META_CONTEXT, &d).await?;
        }
        reply(s, option, NBD_REP_ACK, &[]).await?;
        Ok(Step::Next)
    }
}

/// The queries of a meta context request (export name, query count, queries), or `None` when
/// it is malformed.
fn meta_context_queries(data: &[u8]) -> Option<Vec<String>> {
    let mut d = data;
    let _export = take_string(&mut d)?;
    if d.remaining() < 4 {
        return None;
    }
    let n = d.get_u32();
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(&mut d)?);
    }
    (d.remaining() == 0).then_some(queries)
}
