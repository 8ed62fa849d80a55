//! NBD over TLS (NBD proto.md, "TLS support"): the server's rustls configuration, loaded from
//! PEM files, and the connection stream that is plain until `NBD_OPT_STARTTLS` upgrades it.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Errors loading the TLS configuration (at daemon start).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{0}: {1}")]
    Pem(PathBuf, String),
    /// The certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client CA file cannot verify client certificates (no usable CA certificate).
    #[error("{0}: no usable CA certificate for verifying clients: {1}")]
    ClientCa(PathBuf, String),
}

/// The server side of NBD TLS: who we are, and whether plaintext is allowed.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
    /// Forced TLS (proto.md "FORCEDTLS"): every option but `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD` until TLS is up.
    pub required: bool,
}

impl TlsConfig {
    /// Loads the server certificate chain (`cert`, PEM, leaf first) and its private key (`key`,
    /// PEM: PKCS#8, PKCS#1 or SEC1). TLS 1.2 and 1.3, aws-lc-rs crypto. With `client_ca` (PEM,
    /// one or more CA certificates) every client must present a certificate that chains to one
    /// of them, or the TLS handshake fails (nbdkit's `--tls-verify-peer`); without it no client
    /// certificate is asked for.
    ///
    /// Errors: [`TlsError::Pem`], [`TlsError::NoCertificate`], [`TlsError::ClientCa`],
    /// [`TlsError::Config`].
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        required: bool,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let pem_err = |p: &Path, e: rustls::pki_types::pem::Error| {
            TlsError::Pem(p.to_path_buf(), e.to_string())
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.to_path_buf()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e))? {
                    roots
                        .add(der.map_err(|e| pem_err(ca, e))?)
                        .map_err(|e| TlsError::ClientCa(ca.to_path_buf(), e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::ClientCa(ca.to_path_buf(), e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key_der)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required,
        })
    }

    /// Runs the TLS handshake on `sock` (after `NBD_REP_ACK` to `NBD_OPT_STARTTLS`).
    pub(crate) async fn accept<S>(&self, sock: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor.accept(sock).await
    }
}

/// A connection: plaintext, or TLS after `NBD_OPT_STARTTLS`.
pub enum MaybeTls<S> {
    /// Plaintext.
    Plain(S),
    /// TLS (boxed: the rustls state is large).
    Tls(Box<TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    /// TLS is up.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
